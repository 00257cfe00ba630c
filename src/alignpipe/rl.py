"""The math of PPO for language models: small pure functions on tensors, each tested by hand.

Shapes: ``B`` responses in a batch, ``T`` the longest response in tokens, ``V`` the vocabulary.
Per-token tensors are ``(B, T)`` and right-padded: ``mask`` is 1 on a response's tokens and 0
after its end, and every function here gives padding no weight. :mod:`alignpipe.ppo` drives them.
"""

from __future__ import annotations

from typing import Literal

import torch

KlEstimator = Literal["k1", "k2", "k3"]


# -- masked statistics ---------------------------------------------------------------------------


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``sum(values * mask)`` over ``dim`` (all entries when None)."""
    weighted = values * mask
    return weighted.sum() if dim is None else weighted.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of the entries where ``mask`` is 1: ``sum(values * mask) / sum(mask)``.

    Over all entries (``dim=None``) this is a per-token mean of the whole batch, so a long
    response weighs more than a short one. An all-zero mask gives 0, not NaN.
    """
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance of the masked entries: ``mean((x - mean(x))^2)`` over the mask."""
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask)


def whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Scale the masked entries to unit variance and (with ``shift_mean``) zero mean.

    ``(x - mean) / sqrt(var + eps)`` with mean and population variance over the mask; without
    ``shift_mean`` the mean is added back, so only the scale changes. Padded entries come out 0.

    Args:
        values: ``(B, T)``, e.g. advantages.
        mask: ``(B, T)`` of 0/1.
        shift_mean: Centre on zero (True for advantages, the PPO convention).
        eps: Keeps a constant batch finite.

    Returns:
        ``(B, T)``.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# -- rewards and advantages ----------------------------------------------------------------------


def per_token_kl(
    logp: torch.Tensor, ref_logp: torch.Tensor, kind: KlEstimator = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the log-probs of sampled tokens.

    With ``r = ref_logp - logp`` (tokens sampled from the policy), Schulman's estimators are
    ``k1 = -r`` (unbiased, can be negative), ``k2 = r^2 / 2`` (biased, low variance) and
    ``k3 = (exp(r) - 1) - r`` (unbiased and never negative).

    Args:
        logp: ``(B, T)`` log-probabilities of the sampled tokens under the policy.
        ref_logp: ``(B, T)`` the same under the reference.
        kind: ``k1``, ``k2`` or ``k3``.

    Returns:
        ``(B, T)``; padded positions are whatever the inputs give there, mask them downstream.
    """
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; use k1, k2 or k3")


def token_rewards(
    score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """The reward PPO maximises, per token: the KL penalty everywhere, the score at the end.

    ``r_t = -kl_coef * kl_t`` on every response token, plus ``score`` on the last one (the
    reward model judges whole responses); padding gets 0.

    Args:
        score: ``(B,)`` one score per response.
        kl: ``(B, T)`` per-token KL estimates (:func:`per_token_kl`).
        mask: ``(B, T)``, right-padded; a row must hold at least one token.
        kl_coef: The penalty's weight.

    Returns:
        ``(B, T)``.
    """
    rewards = -kl_coef * kl * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)  # (B,) index of each last token
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += score.to(rewards.dtype)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses.

    ``delta_t = r_t + gamma * m_{t+1} * V_{t+1} - V_t`` and
    ``A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}`` from the last step backwards, where
    ``m_{t+1}`` is 0 past a response's end (and past ``T``): the end of a response is terminal,
    so nothing after it, padding included, flows back. Returns are ``A_t + V_t``.

    Args:
        rewards: ``(B, T)`` per-token rewards (:func:`token_rewards`).
        values: ``(B, T)`` value estimates of the state before each token.
        mask: ``(B, T)`` of 0/1, a prefix of ones per row.
        gamma: Discount.
        lam: GAE's lambda: 0 = one-step TD, 1 = Monte Carlo return minus the value.

    Returns:
        ``(advantages, returns)``, both ``(B, T)`` and 0 on padding.
    """
    mask = mask.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])
    next_mask = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_mask * next_value - values[:, t]
        running = (delta + gamma * lam * next_mask * running) * mask[:, t]
        advantages[:, t] = running
        next_value, next_mask = values[:, t], mask[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


# -- losses --------------------------------------------------------------------------------------


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, to minimise.

    With ``rho = exp(logp - old_logp)``: ``loss = mean(max(-A * rho, -A * clip(rho, 1 - eps,
    1 + eps)))`` over the masked tokens. The max is the pessimistic side: a token whose ratio
    left the trust region in the direction its advantage favours stops pulling.

    Args:
        logp: ``(B, T)`` log-probs of the rollout's tokens under the policy being trained.
        old_logp: ``(B, T)`` the same at rollout time (no gradient).
        advantages: ``(B, T)``.
        mask: ``(B, T)``.
        clip_range: ``eps``.

    Returns:
        ``(loss, clip_fraction, approx_kl)``: scalars. ``clip_fraction`` is the share of tokens
        whose clipped term is the larger (no gradient through them); ``approx_kl`` is the k3
        estimate of KL(old || new), ``mean((rho - 1) - log rho)``, for early stopping.
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(logp.dtype), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: ``0.5 * mean(max((V - R)^2, (V_clip - R)^2))`` over the mask.

    ``V_clip = old_V + clip(V - old_V, -c, c)`` keeps the value head from moving far from its
    rollout-time predictions in one iteration, like the policy's trust region.

    Args:
        values: ``(B, T)`` predictions of the head being trained.
        old_values: ``(B, T)`` predictions at rollout time.
        returns: ``(B, T)`` GAE returns (targets).
        mask: ``(B, T)``.
        clip_range_value: ``c``.

    Returns:
        ``(loss, clip_fraction)``: scalars; the fraction is the share of tokens where the
        clipped error is the larger one.
    """
    clipped_values = old_values + torch.clamp(
        values - old_values, -clip_range_value, clip_range_value
    )
    error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error, clipped_error), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > error).to(values.dtype), mask)
    return loss, clip_fraction


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax of ``logits`` over the last axis: ``logsumexp(z) - sum(p * z)``.

    Args:
        logits: ``(..., V)``.

    Returns:
        ``(...)`` in nats.
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """How much of the returns' variance the values explain: ``1 - Var(R - V) / Var(R)``.

    1 for perfect predictions, 0 for predicting the mean, negative for worse. NaN when the
    returns do not vary (nothing to explain). Population variances over the mask.
    """
    return 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask)


# -- the KL coefficient --------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Keep the coefficient (the same call as the adaptive controller's)."""

    def state_dict(self) -> dict[str, float]:
        """The coefficient, for a checkpoint."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the coefficient from :meth:`state_dict`."""
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """The KL coefficient of Ziegler et al. (2019): steer the measured KL towards a target.

    After a batch of ``n_steps`` samples with KL ``kl``: ``e = clip(kl / target - 1, -0.2,
    0.2)`` and ``coef *= 1 + e * n_steps / horizon``. Too much KL raises the penalty, too little
    lowers it; the clip and the horizon make the adjustment gradual.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        super().__init__(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adjust the coefficient after a batch of ``n_steps`` samples with KL ``current_kl``."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
