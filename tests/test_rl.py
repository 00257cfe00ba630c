"""PPO's math on hand-sized tensors; every expected number is worked out in the test itself."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from alignpipe import rl

# a padded entry holds junk that must not leak into any result
JUNK = 1e3


# ---------------------------------------------------------------------------------------------
# masked statistics and whitening


def test_masked_mean_and_variance_ignore_padding() -> None:
    values = torch.tensor([[1.0, 2.0, JUNK], [4.0, JUNK, JUNK]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # the real entries are 1, 2 and 4
    mean = (1 + 2 + 4) / 3
    var = ((1 - mean) ** 2 + (2 - mean) ** 2 + (4 - mean) ** 2) / 3
    assert_close(rl.masked_mean(values, mask), torch.tensor(mean))
    assert_close(rl.masked_var(values, mask), torch.tensor(var))
    assert_close(rl.masked_sum(values, mask, dim=1), torch.tensor([3.0, 4.0]))
    assert_close(rl.masked_mean(values, mask, dim=1), torch.tensor([1.5, 4.0]))
    # an empty mask is 0, not NaN
    assert rl.masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_whiten_gives_zero_mean_unit_variance_over_the_mask() -> None:
    values = torch.tensor([[1.0, 2.0, JUNK], [4.0, 7.0, JUNK]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    white = rl.whiten(values, mask)
    assert_close(rl.masked_mean(white, mask), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(rl.masked_var(white, mask), torch.tensor(1.0), atol=1e-6, rtol=0)
    assert white[:, 2].tolist() == [0.0, 0.0]
    # by hand: mean 3.5, population variance (6.25 + 2.25 + 0.25 + 12.25) / 4 = 5.25
    assert_close(white[0, 0], torch.tensor((1 - 3.5) / math.sqrt(5.25)))

    # without the shift only the scale changes: the mean stays 3.5
    scaled = rl.whiten(values, mask, shift_mean=False)
    assert_close(rl.masked_mean(scaled, mask), torch.tensor(3.5), atol=1e-5, rtol=0)
    assert_close(rl.masked_var(scaled, mask), torch.tensor(1.0), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# KL, rewards and advantages


def test_kl_estimators_on_known_log_probs() -> None:
    logp = torch.tensor([math.log(0.5)])
    ref_logp = torch.tensor([math.log(0.25)])
    r = math.log(0.25 / 0.5)  # log(p_ref / p)
    assert_close(rl.per_token_kl(logp, ref_logp, "k1"), torch.tensor([-r]))
    assert_close(rl.per_token_kl(logp, ref_logp, "k2"), torch.tensor([0.5 * r**2]))
    assert_close(rl.per_token_kl(logp, ref_logp, "k3"), torch.tensor([math.exp(r) - 1 - r]))
    # equal log-probs: no divergence by any estimate
    for kind in ("k1", "k2", "k3"):
        assert rl.per_token_kl(logp, logp, kind).item() == 0.0
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        rl.per_token_kl(logp, ref_logp, "k4")  # type: ignore[arg-type]


def test_k1_and_k3_are_unbiased_and_k3_never_negative() -> None:
    # over a three-token vocabulary, the expectation under p of each estimate, taken exactly
    p = torch.tensor([0.5, 0.25, 0.25])
    q = torch.tensor([0.25, 0.5, 0.25])
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist(), strict=True))
    for kind in ("k1", "k3"):
        expected = (p * rl.per_token_kl(p.log(), q.log(), kind)).sum()
        assert_close(expected, torch.tensor(kl, dtype=torch.float32))
    biased = (p * rl.per_token_kl(p.log(), q.log(), "k2")).sum()
    assert abs(biased.item() - kl) > 1e-3
    assert rl.per_token_kl(p.log(), q.log(), "k1")[1] < 0  # k1 of one token can be negative
    assert (rl.per_token_kl(p.log(), q.log(), "k3") >= 0).all()


def test_token_rewards_put_the_score_on_the_last_real_token() -> None:
    score = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, JUNK]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = rl.token_rewards(score, kl, mask, kl_coef=0.5)
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.2, -0.25 + 2.0, 0.0]])
    assert_close(rewards, expected)


def test_gae_by_hand_on_one_response() -> None:
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    mask = torch.ones(1, 3)
    # backwards from the last token; nothing follows it
    delta2 = 2.0 + 0.0 - 1.5  # 0.5
    a2 = delta2
    delta1 = 0.0 + gamma * 1.5 - 1.0  # 0.35
    a1 = delta1 + gamma * lam * a2  # 0.35 + 0.72 * 0.5 = 0.71
    delta0 = 1.0 + gamma * 1.0 - 0.5  # 1.4
    a0 = delta0 + gamma * lam * a1  # 1.4 + 0.72 * 0.71 = 1.9112
    advantages, returns = rl.gae(rewards, values, mask, gamma, lam)
    assert_close(advantages, torch.tensor([[a0, a1, a2]]))
    assert_close(returns, torch.tensor([[a0 + 0.5, a1 + 1.0, a2 + 1.5]]))
    assert_close(advantages[0, 0], torch.tensor(1.9112))


def test_gae_ignores_padding_and_other_rows() -> None:
    gamma, lam = 0.9, 0.8
    # row 1 is the response above; row 2 is two tokens long, then junk in its padding
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, JUNK]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.2, 0.4, JUNK]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = rl.gae(rewards, values, mask, gamma, lam)
    alone, _ = rl.gae(rewards[:1], values[:1], mask[:1], gamma, lam)
    assert_close(advantages[:1], alone)
    # row 2 by hand: its second token is terminal
    a1 = 1.0 - 0.4
    a0 = (0.5 + gamma * 0.4 - 0.2) + gamma * lam * a1
    assert_close(advantages[1], torch.tensor([a0, a1, 0.0]))
    assert_close(returns[1], torch.tensor([a0 + 0.2, a1 + 0.4, 0.0]))


def test_gae_with_gamma_and_lambda_one_is_return_to_go_minus_value() -> None:
    rewards = torch.tensor([[0.1, -0.2, 0.3, 1.0]])
    values = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    advantages, returns = rl.gae(rewards, values, torch.ones(1, 4), gamma=1.0, lam=1.0)
    to_go = torch.tensor([[1.2, 1.1, 1.3, 1.0]])
    assert_close(returns, to_go)
    assert_close(advantages, to_go - values)


# ---------------------------------------------------------------------------------------------
# losses


def test_clipped_policy_loss_inside_and_outside_the_clip_range() -> None:
    clip = 0.2
    ratios = [0.5, 1.1, 1.5, 0.5, 3.0]
    advantages = torch.tensor([[1.0, -1.0, 2.0, -1.0, JUNK]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    old_logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]])
    logp = (old_logp + torch.tensor([ratios]).log()).requires_grad_()
    loss, clip_fraction, approx_kl = rl.policy_loss(logp, old_logp, advantages, mask, clip)

    # per token: max(-A * r, -A * clip(r, 0.8, 1.2))
    # r=0.5, A=1:  max(-0.5, -0.8) = -0.5   unclipped (the ratio fell, the advantage is good)
    # r=1.1, A=-1: max(1.1, 1.1) = 1.1      inside the range
    # r=1.5, A=2:  max(-3.0, -2.4) = -2.4   clipped (moved far enough in the favoured direction)
    # r=0.5, A=-1: max(0.5, 0.8) = 0.8      clipped
    assert_close(loss, torch.tensor((-0.5 + 1.1 - 2.4 + 0.8) / 4))
    assert_close(clip_fraction, torch.tensor(2 / 4))
    k3 = [r - 1 - math.log(r) for r in ratios[:4]]
    assert_close(approx_kl, torch.tensor(sum(k3) / 4))

    # a clipped token passes no gradient; an unclipped one d(-A r)/d logp = -A r, over 4 tokens
    loss.backward()
    assert_close(logp.grad, torch.tensor([[-1.0 * 0.5 / 4, 1.1 / 4, 0.0, 0.0, 0.0]]))


def test_policy_loss_at_the_rollout_policy_is_minus_the_mean_advantage() -> None:
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    advantages = torch.tensor([[0.5, -1.5, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clip_fraction, approx_kl = rl.policy_loss(logp, logp, advantages, mask, 0.2)
    assert_close(loss, torch.tensor(0.5))  # -(0.5 - 1.5) / 2
    assert clip_fraction.item() == 0.0 and approx_kl.item() == 0.0


def test_clipped_value_loss() -> None:
    clip = 0.2
    values = torch.tensor([[1.0, 2.0, 0.0, JUNK]])
    old_values = torch.tensor([[0.5, 1.9, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clip_fraction = rl.value_loss(values, old_values, returns, mask, clip)
    # v=1.0: clipped to 0.5 + 0.2 = 0.7; errors (1 - 2)^2 = 1 and (0.7 - 2)^2 = 1.69 -> 1.69
    # v=2.0: 1.9 + 0.1 is inside the range; both errors (2 - 0)^2 = 4 -> 4
    # v=0.0: clipped to 1.0 - 0.2 = 0.8; errors 9 and (0.8 - 3)^2 = 4.84 -> 9
    assert_close(loss, torch.tensor(0.5 * (1.69 + 4.0 + 9.0) / 3))
    assert_close(clip_fraction, torch.tensor(1 / 3))


def test_entropy_from_logits() -> None:
    probs = torch.tensor([0.5, 0.25, 0.25])
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert_close(rl.entropy_from_logits(probs.log()), torch.tensor(expected))
    # logits are defined up to a constant; a uniform distribution has log(V)
    assert_close(rl.entropy_from_logits(probs.log() + 7.0), torch.tensor(expected))
    assert_close(rl.entropy_from_logits(torch.zeros(2, 4)), torch.full((2,), math.log(4)))


def test_explained_variance() -> None:
    returns = torch.tensor([[1.0, 2.0, JUNK], [3.0, 6.0, JUNK]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    perfect = returns.clone()
    perfect[:, 2] = -JUNK  # predictions in the padding do not count
    assert_close(rl.explained_variance(perfect, returns, mask), torch.tensor(1.0))
    # predicting the mean (3) explains nothing
    assert_close(
        rl.explained_variance(torch.full_like(returns, 3.0), returns, mask), torch.tensor(0.0)
    )
    # a constant offset has no variance: everything is explained
    assert_close(rl.explained_variance(returns + 1.0, returns, mask), torch.tensor(1.0))
    # predicting the negated deviations: Var(2 (R - mean)) = 4 * 3.5 -> 1 - 4 = -3
    flipped = 6.0 - returns
    assert_close(rl.explained_variance(flipped, returns, mask), torch.tensor(-3.0))


# ---------------------------------------------------------------------------------------------
# KL coefficient


def test_adaptive_kl_controller_follows_ziegler() -> None:
    controller = rl.AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL 9 is 50% over target; the error is clipped to +0.2
    controller.update(current_kl=9.0, n_steps=64)
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    # KL 5.4 is 10% under: -0.1, not clipped
    after_first = controller.value
    controller.update(current_kl=5.4, n_steps=100)
    assert controller.value == pytest.approx(after_first * (1 - 0.1 * 100 / 10000))
    # on target: unchanged
    settled = controller.value
    controller.update(current_kl=6.0, n_steps=1000)
    assert controller.value == pytest.approx(settled)

    restored = rl.AdaptiveKLController(init_kl_coef=0.5, target=6.0, horizon=10000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value


def test_fixed_kl_controller_never_moves() -> None:
    controller = rl.FixedKLController(0.05)
    controller.update(current_kl=100.0, n_steps=64)
    assert controller.value == 0.05
    other = rl.FixedKLController(1.0)
    other.load_state_dict(controller.state_dict())
    assert other.value == 0.05
