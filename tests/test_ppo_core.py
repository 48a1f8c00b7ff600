"""PPO-ptx math checked against values worked out by hand (the arithmetic is written next to each expectation)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from selfcorrect.train.ppo_core import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae_advantages,
    kl_k1,
    kl_k3,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    ptx_loss,
    value_loss,
)

LN2 = math.log(2.0)


def t(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(actual: torch.Tensor | float, expected: torch.Tensor | list | float, atol: float = 1e-12) -> None:
    actual = torch.as_tensor(actual, dtype=torch.float64)
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------------- GAE


def test_gae_by_hand_gamma_1_lambda_095() -> None:
    # rewards r = [0, 0, 1], values V = [0.5, 0.25, 0.75], gamma = 1, lambda = 0.95, V after the end = 0.
    # delta_2 = r_2 + 0     - V_2 = 1 - 0.75        =  0.25
    # delta_1 = r_1 + V_2   - V_1 = 0 + 0.75 - 0.25 =  0.5
    # delta_0 = r_0 + V_1   - V_0 = 0 + 0.25 - 0.5  = -0.25
    # A_2 = 0.25
    # A_1 = 0.5   + 0.95 * 0.25   = 0.7375
    # A_0 = -0.25 + 0.95 * 0.7375 = -0.25 + 0.700625 = 0.450625
    # returns = A + V = [0.950625, 0.9875, 1.0]
    rewards, values, mask = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.25, 0.75]]), t([[1, 1, 1]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    close(advantages, [[0.450625, 0.7375, 0.25]])
    close(returns, [[0.950625, 0.9875, 1.0]])


def test_gae_with_lambda_1_gives_reward_to_go() -> None:
    # gamma = lambda = 1: A_t + V_t = sum of rewards from t on: [0 + 0 + 1, 0 + 1, 1] = [1, 1, 1]; [2+3, 3] = [5, 3]
    rewards, values = t([[0.0, 0.0, 1.0], [2.0, 3.0, 0.0]]), t([[0.5, 0.25, 0.75], [-1.0, 4.0, 0.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    _, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    close(returns, [[1.0, 1.0, 1.0], [5.0, 3.0, 0.0]])


def test_gae_by_hand_with_discount() -> None:
    # Same rewards and values, gamma = 0.5, lambda = 0.5 (gamma * lambda = 0.25):
    # delta_2 = 1 - 0.75                = 0.25
    # delta_1 = 0 + 0.5 * 0.75 - 0.25   = 0.125
    # delta_0 = 0 + 0.5 * 0.25 - 0.5    = -0.375
    # A_2 = 0.25 ; A_1 = 0.125 + 0.25 * 0.25 = 0.1875 ; A_0 = -0.375 + 0.25 * 0.1875 = -0.328125
    rewards, values, mask = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.25, 0.75]]), t([[1, 1, 1]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.5, lam=0.5)
    close(advantages, [[-0.328125, 0.1875, 0.25]])
    close(returns, [[0.171875, 0.4375, 1.0]])


def test_gae_padded_batch_does_not_leak() -> None:
    # Row 0: the hand example above, right-padded with garbage rewards/values.
    # Row 1: a prompt token at position 0 (masked, garbage), response at 1..2, then padding.
    #   delta_2 = 2 - 0.5 = 1.5 ; delta_1 = 0 + 0.5 - 1 = -0.5
    #   A_2 = 1.5 ; A_1 = -0.5 + 0.95 * 1.5 = 0.925 ; returns = [1.925, 2.0]
    rewards = t([[0.0, 0.0, 1.0, 9.0, -7.0], [5.0, 0.0, 2.0, 100.0, 3.0]])
    values = t([[0.5, 0.25, 0.75, 8.0, 6.0], [3.0, 1.0, 0.5, -20.0, 11.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    close(advantages, [[0.450625, 0.7375, 0.25, 0.0, 0.0], [0.0, 0.925, 1.5, 0.0, 0.0]])
    close(returns, [[0.950625, 0.9875, 1.0, 0.0, 0.0], [0.0, 1.925, 2.0, 0.0, 0.0]])


# ---------------------------------------------------------------------------------------------------- statistics


def test_masked_mean_and_var() -> None:
    x = t([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, -50.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    # masked entries 1, 2, 3, 4, 5: mean 3; squared deviations 4 + 1 + 0 + 1 + 4 = 10; var 10/4 = 2.5 (unbiased)
    close(masked_mean(x, mask), 3.0)
    close(masked_mean(x, mask, dim=1), [2.0, 4.5])
    close(masked_var(x, mask), 2.5)
    close(masked_var(x, mask, unbiased=False), 2.0)
    with pytest.raises(ValueError):
        masked_var(x, t([[1, 0, 0, 0], [0, 0, 0, 0]]))


def test_masked_whiten_uses_masked_entries_only() -> None:
    x = t([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    white = masked_whiten(x, mask)
    close(masked_mean(white, mask), 0.0)
    close(masked_var(white, mask), 1.0, atol=1e-8)  # var / (var + 1e-8)
    # (x - 3) / sqrt(2.5): the padding values 100 and -50 do not enter the statistics and are zeroed
    expected = (t([[1.0, 2.0, 3.0, 3.0], [4.0, 5.0, 3.0, 3.0]]) - 3.0) / math.sqrt(2.5 + 1e-8)
    close(white, expected)
    kept_mean = masked_whiten(x, mask, shift_mean=False)
    close(masked_mean(kept_mean, mask), 3.0)
    close(kept_mean[0, 3], 0.0)


# ---------------------------------------------------------------------------------------------------- KL


def test_kl_estimators_on_known_values() -> None:
    logp = torch.log(t([0.5, 0.25, 0.3]))
    ref = torch.log(t([0.25, 0.5, 0.3]))
    # k1 = log p - log p_ref = [log 2, -log 2, 0]
    close(kl_k1(logp, ref), [LN2, -LN2, 0.0])
    close(kl_k1(logp, ref).mean(), 0.0)
    # k3 = (r - 1) - log r, r = p_ref / p: r = 0.5 -> -0.5 + log 2 ; r = 2 -> 1 - log 2 ; r = 1 -> 0
    k3 = kl_k3(logp, ref)
    close(k3, [LN2 - 0.5, 1.0 - LN2, 0.0])
    assert bool((k3 >= 0).all())
    random_k3 = kl_k3(torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64))
    assert bool((random_k3 >= 0).all())
    assert kl_k3(logp, logp).abs().max().item() == 0.0


def test_per_token_rewards_score_at_each_rows_last_token() -> None:
    # Row 0: response at 0..2 (padding at 3). k1 = [-1 + 1.5, -2 + 1, -0.5 + 0.5] = [0.5, -1, 0]
    #   r = -0.1 * k1 = [-0.05, 0.1, 0] and the score 2 at position 2 -> [-0.05, 0.1, 2.0, 0]
    # Row 1: prompt at 0, response at 1..2, padding at 3. k1 = [-0.25 + 0.5, -1 + 0.75] = [0.25, -0.25]
    #   r = [-0.025, 0.025] and the score -1 at position 2 -> [0, -0.025, -0.975, 0]
    logprobs = t([[-1.0, -2.0, -0.5, -9.0], [-3.0, -0.25, -1.0, -4.0]])
    ref_logprobs = t([[-1.5, -1.0, -0.5, 3.0], [-1.0, -0.5, -0.75, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]])
    rewards, kl = per_token_rewards(t([2.0, -1.0]), logprobs, ref_logprobs, mask, kl_coef=0.1)
    close(kl, [[0.5, -1.0, 0.0, 0.0], [0.0, 0.25, -0.25, 0.0]])
    close(rewards, [[-0.05, 0.1, 2.0, 0.0], [0.0, -0.025, -0.975, 0.0]])

    # Different lengths: the score goes to position 0 of a one-token row and position 3 of a full row.
    rewards, _ = per_token_rewards(
        t([5.0, 7.0]),
        torch.zeros(2, 4, dtype=torch.float64),
        torch.zeros(2, 4, dtype=torch.float64),
        t([[1, 0, 0, 0], [1, 1, 1, 1]]),
        0.02,
    )
    close(rewards, [[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 7.0]])


def test_last_token_index() -> None:
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0]])
    assert last_token_index(mask).tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))


# ---------------------------------------------------------------------------------------------------- losses


def test_policy_loss_clipping_by_hand() -> None:
    # eps = 0.2; loss_t = max(-A rho, -A clip(rho, 0.8, 1.2))
    #   rho 1.5, A +1: max(-1.5, -1.2) = -1.2   clipped (the gain is capped at 1.2)
    #   rho 0.5, A +1: max(-0.5, -0.8) = -0.5   not clipped
    #   rho 0.5, A -1: max( 0.5,  0.8) =  0.8   clipped
    #   rho 1.5, A -1: max( 1.5,  1.2) =  1.5   not clipped
    #   rho 1.0, A +2: max(-2.0, -2.0) = -2.0   not clipped
    #   (a sixth, padded token with rho 3 and A 10 must not count)
    # loss = (-1.2 - 0.5 + 0.8 + 1.5 - 2.0) / 5 = -1.4 / 5 = -0.28 ; clipfrac = 2 / 5
    # approx_kl = 0.5 * (2 ln(1.5)^2 + 2 ln(0.5)^2 + 0) / 5 = (ln(1.5)^2 + ln(2)^2) / 5
    old = t([[-1.0, -1.0, -1.0, -1.0, -1.0, -1.0]])
    ratios = t([[1.5, 0.5, 0.5, 1.5, 1.0, 3.0]])
    logprobs = (old + torch.log(ratios)).requires_grad_(True)
    advantages = t([[1.0, 1.0, -1.0, -1.0, 2.0, 10.0]])
    mask = t([[1, 1, 1, 1, 1, 0]])
    loss, clipfrac, approx_kl = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    close(loss.detach(), -0.28, atol=1e-12)
    close(clipfrac, 0.4)
    close(approx_kl, (math.log(1.5) ** 2 + LN2**2) / 5)
    loss.backward()
    # d loss / d logp_t = -A_t rho_t / 5 where unclipped, 0 where clipped or padded:
    # [0, -0.5/5, 0, 1.5/5, -2/5, 0] = [0, -0.1, 0, 0.3, -0.4, 0]
    close(logprobs.grad, [[0.0, -0.1, 0.0, 0.3, -0.4, 0.0]], atol=1e-12)


def test_value_loss_clipping_by_hand() -> None:
    # c = 0.2, old values 0, so clip(V) lies in [-0.2, 0.2]
    #   V 0.5, R  1: (0.5 - 1)^2 = 0.25 vs (0.2 - 1)^2 = 0.64 -> 0.64 clipped
    #   V 0.1, R  1: (0.1 - 1)^2 = 0.81 vs the same       -> 0.81 not clipped
    #   V 0.5, R -1: (0.5 + 1)^2 = 2.25 vs (0.2 + 1)^2 = 1.44 -> 2.25 not clipped
    #   (padded token ignored)
    # loss = 0.5 * (0.64 + 0.81 + 2.25) / 3 = 0.5 * 3.7 / 3 ; clipfrac = 1/3
    values = t([[0.5, 0.1, 0.5, 50.0]])
    old_values = torch.zeros_like(values)
    returns = t([[1.0, 1.0, -1.0, -50.0]])
    mask = t([[1, 1, 1, 0]])
    loss, clipfrac = value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    close(loss, 0.5 * 3.7 / 3)
    close(clipfrac, 1 / 3)


def test_entropy_and_logprobs_from_logits() -> None:
    # Uniform over 4 -> ln 4 (at any shift of the logits); probabilities (0.5, 0.25, 0.25) ->
    # -(0.5 ln 0.5 + 2 * 0.25 ln 0.25) = 0.5 ln 2 + 0.5 ln 4 = 1.5 ln 2
    close(entropy_from_logits(torch.tensor([[[0.0] * 4, [7.0] * 4]])), [[math.log(4), math.log(4)]], atol=1e-6)
    probs = torch.tensor([[[0.5, 0.25, 0.25]]])
    close(entropy_from_logits(torch.log(probs) + 3.0), [[1.5 * LN2]], atol=1e-6)
    close(logprobs_from_logits(torch.log(probs) + 3.0, torch.tensor([[1]])), [[math.log(0.25)]], atol=1e-6)


def test_ptx_loss_is_per_token_mean_of_next_token_cross_entropy() -> None:
    # Vocabulary of 2. Row 0: labels [0, 1, 0], mask [1, 1, 0]: only the target at position 1 (label 1) counts,
    #   predicted by logits[0, 0] = [0, 0] -> p = 0.5 -> -ln 0.5 = ln 2.
    # Row 1: labels [1, 0, 1], all real: targets 0 (p = 0.25) and 1 (p = 0.5) -> ln 4 and ln 2.
    # Mean over the 3 counted tokens (not of per-row means): (ln 2 + ln 4 + ln 2) / 3 = 4 ln 2 / 3.
    logits = torch.zeros(2, 3, 2)
    logits[0, 1] = torch.tensor([10.0, -10.0])  # predicts a masked label: must not count
    logits[1, 0] = torch.log(torch.tensor([0.25, 0.75]))
    labels = torch.tensor([[0, 1, 0], [1, 0, 1]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    close(ptx_loss(logits, labels, mask), 4 * LN2 / 3, atol=1e-6)
    # -100 labels are ignored like masked ones: same value
    close(ptx_loss(logits, torch.tensor([[0, 1, -100], [1, 0, 1]])), 4 * LN2 / 3, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- KL control


def test_adaptive_kl_controller_by_hand() -> None:
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # kl 12: 12/6 - 1 = 1 -> clipped to 0.2 ; mult = 1 + 0.2 * 256 / 10000 = 1.00512
    assert ctl.update(12.0, n_steps=256) == pytest.approx(0.1 * 1.00512, rel=1e-12)
    # kl 3: 3/6 - 1 = -0.5 -> clipped to -0.2 ; mult = 1 - 0.00512 = 0.99488
    ctl.update(torch.tensor(3.0), n_steps=256)
    assert ctl.value == pytest.approx(0.1 * 1.00512 * 0.99488, rel=1e-12)
    # kl 6.6: error 0.1 (inside the clip) ; mult = 1 + 0.1 * 256 / 10000 = 1.00256
    ctl.update(6.6, n_steps=256)
    assert ctl.value == pytest.approx(0.1 * 1.00512 * 0.99488 * 1.00256, rel=1e-12)
    before = ctl.value
    ctl.update(6.0, n_steps=256)  # on target: unchanged
    assert ctl.value == pytest.approx(before, rel=1e-15)


def test_fixed_kl_controller_never_changes() -> None:
    ctl = FixedKLController(0.02)
    for kl in (0.0, 100.0, -5.0):
        ctl.update(kl, n_steps=512)
    assert ctl.value == 0.02


def test_kl_controller_state_round_trips_through_json() -> None:
    ctl = AdaptiveKLController(0.05, target=6.0, horizon=10000)
    ctl.update(20.0, n_steps=64)
    restored = AdaptiveKLController(0.05, target=6.0, horizon=10000)
    restored.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert restored.value == ctl.value and restored.target == 6.0 and restored.horizon == 10000
    fixed = FixedKLController(0.3)
    fixed_restored = FixedKLController(0.0)
    fixed_restored.load_state_dict(json.loads(json.dumps(fixed.state_dict())))
    assert fixed_restored.value == 0.3
    with pytest.raises(ValueError, match="adaptive"):
        fixed_restored.load_state_dict(ctl.state_dict())


def test_the_ppo_ptx_loss_is_its_parts_assembled():
    from selfcorrect.train import ppo_core as core

    torch.manual_seed(0)
    b, t, v = 3, 5, 11
    logprobs, old = torch.randn(b, t) * 0.1 - 2, torch.randn(b, t) * 0.1 - 2
    advantages, values, old_values, returns = torch.randn(b, t), torch.randn(b, t), torch.randn(b, t), torch.randn(b, t)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    ptx_logits, ptx_labels = torch.randn(2, 6, v), torch.randint(0, v, (2, 6))
    ptx_mask = torch.ones(2, 6, dtype=torch.long)
    loss = core.ppo_ptx_loss(
        logprobs,
        old,
        advantages,
        values,
        old_values,
        returns,
        mask,
        clip_range=0.2,
        clip_range_value=0.3,
        vf_coef=0.1,
        ptx=(ptx_logits, ptx_labels, ptx_mask),
        gamma_ptx=27.8,
    )
    pg, pg_clip, approx_kl = core.policy_loss(logprobs, old, advantages, mask, 0.2)
    vf, vf_clip = core.value_loss(values, old_values, returns, mask, 0.3)
    lm = core.ptx_loss(ptx_logits, ptx_labels, ptx_mask)
    assert torch.allclose(loss.total, pg + 0.1 * vf + 27.8 * lm)
    assert (loss.policy, loss.value, loss.ptx) == (pg, vf, lm)
    assert (loss.policy_clipfrac, loss.value_clipfrac, loss.approx_kl) == (pg_clip, vf_clip, approx_kl)
    no_ptx = core.ppo_ptx_loss(
        logprobs,
        old,
        advantages,
        values,
        old_values,
        returns,
        mask,
        clip_range=0.2,
        clip_range_value=0.3,
        vf_coef=0.1,
        gamma_ptx=27.8,
    )
    assert torch.allclose(no_ptx.total, pg + 0.1 * vf) and no_ptx.ptx.item() == 0.0


def test_logprobs_equal_the_log_softmax_they_replace():
    torch.manual_seed(0)
    logits, tokens = torch.randn(3, 7, 50) * 4, torch.randint(0, 50, (3, 7))
    expected = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logprobs_from_logits(logits, tokens), expected, atol=1e-5)
