"""Chapter 04: noise schedules of the variance-preserving forward process, and their timesteps.

    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),  alpha_bar_t = prod_{s <= t} (1 - beta_s)

In discrete time a schedule is its betas; in continuous time (the last section) it is a log-SNR function
lambda(t) = log(alpha_bar / (1 - alpha_bar)) on [0, 1], fixed (`LinearLogSNR`) or learned (`MonotoneLogSNR`).
The discrete schedules are computed the way diffusers computes them (float32 `torch.cumprod`, the cosine
schedule's betas in Python floats then cast), so that the samplers of chapter 05 agree with
diffusers' schedulers to the last bit. Integer steps are `timestep` in 0..num_steps-1, as in
diffusers: index 0 is the book's t = 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

SCHEDULES = ("linear", "cosine", "scaled_linear")
SPACINGS = ("leading", "trailing", "linspace")


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. (2020)'s schedule: betas evenly spaced from beta_start to beta_end, float32, shape (T,)."""
    _check_steps(num_steps)
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float32)


def scaled_linear_betas(num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's schedule: sqrt(beta) evenly spaced, float32, shape (T,)."""
    _check_steps(num_steps)
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float32) ** 2


def cosine_betas(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021, Eq. 17) cosine schedule, as diffusers' "squaredcos_cap_v2".

        alpha_bar(t) = cos((t + s) / (1 + s) * pi / 2)^2,  beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta)

    computed in Python floats, then cast to float32. Unclipped, alpha_bar at t = 1 would be ~1e-33; the
    cap keeps the last beta below 1.
    """
    _check_steps(num_steps)
    f = lambda t: math.cos((t + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f((i + 1) / num_steps) / f(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(name: str, num_steps: int = 1000) -> torch.Tensor:
    """Betas of a named schedule: "linear", "cosine" or "scaled_linear"."""
    builders = {"linear": linear_betas, "cosine": cosine_betas, "scaled_linear": scaled_linear_betas}
    if name not in builders:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    return builders[name](num_steps)


def alpha_bar_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s), by `torch.cumprod` in the betas' dtype (as diffusers)."""
    if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
        raise ValueError("betas must be a 1-D tensor of values in (0, 1)")
    return torch.cumprod(1.0 - betas, dim=0)


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) (Kingma et al. 2021; Luo eq. 109)."""
    return alpha_bar / (1 - alpha_bar)


def logsnr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """log SNR = log alpha_bar - log(1 - alpha_bar)."""
    return torch.log(alpha_bar) - torch.log1p(-alpha_bar)


def inference_timesteps(
    num_train_steps: int, num_inference_steps: int, spacing: str = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """The decreasing timesteps a sampler visits, exactly as diffusers' `set_timesteps` (int64).

    - "leading": 0, r, 2r, ... with r = T // N, reversed, plus `steps_offset` (DDPM/DDIM default);
    - "trailing": round(T, T - T/N, ...) - 1, which starts at T - 1;
    - "linspace": round(linspace(0, T - 1, N)), reversed.
    """
    _check_steps(num_train_steps)
    if not 0 < num_inference_steps <= num_train_steps:
        raise ValueError(f"num_inference_steps must be in 1..{num_train_steps}, got {num_inference_steps}")
    if spacing == "leading":
        ratio = num_train_steps // num_inference_steps
        steps = (np.arange(0, num_inference_steps) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    elif spacing == "trailing":
        steps = np.round(np.arange(num_train_steps, 0, -num_train_steps / num_inference_steps)).astype(np.int64) - 1
    elif spacing == "linspace":
        steps = np.linspace(0, num_train_steps - 1, num_inference_steps).round()[::-1].copy().astype(np.int64)
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    return torch.from_numpy(steps)


def _check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps <= 0:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")


# --------------------------------------------------------------------------------------------
# Continuous time: a schedule is a log-SNR function lambda(t) on [0, 1] (Kingma et al. 2021)
# --------------------------------------------------------------------------------------------


def betas_from_logsnr(logsnr_fn, num_steps: int) -> torch.Tensor:
    """Betas whose latents sit at s = 0, 1/(T-1), ..., 1 of a log-SNR function: alpha_bar_i = sigmoid(logsnr(s_i)).

    The first latent has SNR exp(logsnr(0)) and the last exp(logsnr(1)), whatever T is: the endpoints
    of the continuous-time schedule (Kingma et al. 2021) stay fixed as T grows.
    """
    s = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    alpha_bar = torch.sigmoid(logsnr_fn(s))
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    return 1 - alpha_bar / prev


class MonotoneLogSNR(nn.Module):
    """A learnable noise schedule: the log-SNR lambda(t) = log(alpha_t^2 / sigma_t^2), decreasing in t by construction.

        raw(t) = l1(t) + l3(sigmoid(l2(l1(t))))  with every weight softplus-positive, so raw is increasing,
        lambda(t) = lambda_max + (lambda_min - lambda_max) (raw(t) - raw(0)) / (raw(1) - raw(0))

    so the SNR decreases strictly from exp(lambda_max) at t = 0 to exp(lambda_min) at t = 1; the endpoints are
    parameters too. alpha_t^2 = sigmoid(lambda), sigma_t^2 = sigmoid(-lambda) (Luo eqs. 111-114). This is the
    monotone network of Kingma et al. (2021, App. H), who write the schedule as gamma = -lambda, increasing in t.

    Args:
        logsnr_max: lambda(0), the log-SNR at t = 0 (the least noise).
        logsnr_min: lambda(1), the log-SNR at t = 1 (the most noise); below logsnr_max.
        hidden: width of the monotone network's hidden layer.
    """

    def __init__(self, logsnr_max: float = 10.0, logsnr_min: float = -8.0, hidden: int = 1024):
        super().__init__()
        self.logsnr_max, self.logsnr_min = nn.Parameter(torch.tensor(logsnr_max)), nn.Parameter(torch.tensor(logsnr_min))
        self.w1, self.b1 = nn.Parameter(torch.randn(1)), nn.Parameter(torch.zeros(1))
        self.w2, self.b2 = nn.Parameter(torch.randn(hidden)), nn.Parameter(torch.randn(hidden))
        self.w3 = nn.Parameter(torch.randn(hidden) / hidden**0.5)

    def _raw(self, t: torch.Tensor) -> torch.Tensor:
        pos = nn.functional.softplus
        h = pos(self.w1) * t[..., None] + self.b1  # (..., 1)
        return h[..., 0] + torch.sigmoid(pos(self.w2) * h + self.b2) @ pos(self.w3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """lambda(t), the log-SNR at t in [0, 1]: same shape as t."""
        ends = self._raw(torch.tensor([0.0, 1.0], dtype=t.dtype, device=t.device))
        return self.logsnr_max + (self.logsnr_min - self.logsnr_max) * (self._raw(t) - ends[0]) / (ends[1] - ends[0])

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_t^2 = sigmoid(lambda(t)), the signal variance at t: same shape as t."""
        return torch.sigmoid(self(t))


class LinearLogSNR(nn.Module):
    """A fixed schedule, linear in log-SNR: lambda(t) = lambda_max + (lambda_min - lambda_max) t; no parameters.

    The defaults are the endpoints of Kingma et al. (2021): SNR from exp(13.3) at t = 0 to exp(-5) at t = 1.
    """

    def __init__(self, logsnr_max: float = 13.3, logsnr_min: float = -5.0):
        super().__init__()
        self.logsnr_max, self.logsnr_min = logsnr_max, logsnr_min

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """lambda(t), the log-SNR at t in [0, 1]: same shape as t."""
        return self.logsnr_max + (self.logsnr_min - self.logsnr_max) * t
