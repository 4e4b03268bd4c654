"""Chapter 04: noise schedules of the variance-preserving forward process, and their timesteps.

    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),  alpha_bar_t = prod_{s <= t} (1 - beta_s)

Everything here is computed the way diffusers computes it (float32 `torch.cumprod`, the cosine
schedule's betas in Python floats then cast), so that the samplers of chapter 05 agree with
diffusers' schedulers to the last bit. Integer steps are `timestep` in 0..num_steps-1, as in
diffusers: index 0 is the book's t = 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch

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
