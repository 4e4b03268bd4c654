"""Chapter 04 (groundwork): the discrete-time variational bound's terms as closed forms.

For the variance-preserving chain with alpha_t = alpha_bar_t / alpha_bar_{t-1} (Luo 2022, Sec. 2.4-2.5):

    sigma_q^2(t) = (1 - alpha_t)(1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)                     (Luo eq. 85)
    KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t)) = w_x0(t) |x0_hat - x0|^2              (Luo eq. 99)
        w_x0(t)  = alpha_bar_{t-1} (1 - alpha_t)^2 / (2 sigma_q^2(t) (1 - alpha_bar_t)^2)
                 = (SNR(t-1) - SNR(t)) / 2                                                     (Luo eq. 110)
        w_eps(t) = (1 - alpha_t)^2 / (2 sigma_q^2(t) (1 - alpha_bar_t) alpha_t)                 (Luo eq. 130)

All functions take alpha_bar_t and alpha_bar_{t-1} explicitly (t >= 2, so alpha_bar_{t-1} < 1).
"""

from __future__ import annotations

import torch


def posterior_variance(alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor) -> torch.Tensor:
    """sigma_q^2(t) of q(x_{t-1} | x_t, x0): the reverse variance fixed by the schedule alone."""
    alpha_t = alpha_bar_t / alpha_bar_prev
    return (1 - alpha_t) * (1 - alpha_bar_prev) / (1 - alpha_bar_t)


def x0_loss_weight(alpha_bar_t, alpha_bar_prev):
    """w_x0(t) of Luo eq. 99, from the Gaussian KL with equal variances."""
    alpha_t = alpha_bar_t / alpha_bar_prev
    return alpha_bar_prev * (1 - alpha_t) ** 2 / (2 * posterior_variance(alpha_bar_t, alpha_bar_prev) * (1 - alpha_bar_t) ** 2)


def snr_loss_weight(alpha_bar_t, alpha_bar_prev):
    """(SNR(t-1) - SNR(t)) / 2 (Luo eq. 110): positive exactly when the SNR decreases."""
    snr = lambda a: a / (1 - a)  # noqa: E731
    return 0.5 * (snr(alpha_bar_prev) - snr(alpha_bar_t))


def eps_loss_weight(alpha_bar_t, alpha_bar_prev):
    """w_eps(t) of Luo eq. 130: the same KL written with the noise prediction."""
    alpha_t = alpha_bar_t / alpha_bar_prev
    return (1 - alpha_t) ** 2 / (2 * posterior_variance(alpha_bar_t, alpha_bar_prev) * (1 - alpha_bar_t) * alpha_t)


def kl_equal_variance(mean_q: torch.Tensor, mean_p: torch.Tensor, var) -> torch.Tensor:
    """KL(N(mean_q, var I) || N(mean_p, var I)) = |mean_q - mean_p|^2 / (2 var), per example (B,) (Luo eq. 92)."""
    var = torch.as_tensor(var, dtype=mean_q.dtype)
    var = var.reshape(*var.shape, *([1] * (mean_q.ndim - var.ndim)))  # a scalar or one variance per example
    return ((mean_q - mean_p) ** 2 / (2 * var)).reshape(mean_q.shape[0], -1).sum(1)


def prior_matching_kl(x0: torch.Tensor, alpha_bar_last) -> torch.Tensor:
    """KL(q(x_T | x0) || N(0, I)) = 1/2 [alpha_bar |x0|^2 + d (1 - alpha_bar) - d - d log(1 - alpha_bar)], per example."""
    a = torch.as_tensor(alpha_bar_last, dtype=x0.dtype)
    sq = (x0**2).reshape(x0.shape[0], -1).sum(1)
    d = x0[0].numel()
    return 0.5 * (a * sq + d * (1 - a) - d - d * torch.log1p(-a))
