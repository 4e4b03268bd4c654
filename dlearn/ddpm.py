"""Chapter 05: DDPM's forward sample, its parameterisations, and the ancestral sampler step.

Names follow the probability objects (as in openai/improved-diffusion): `q_sample` draws from
q(x_t | x_0); `posterior_mean_var` is q(x_{t-1} | x_t, x_0); `ddpm_step` is one draw from
p_theta(x_{t-1} | x_t). The arithmetic is diffusers' (`DDPMScheduler.step`), so the two agree
exactly in float32; in particular beta_t is recomputed from alpha_bar as 1 - alpha_bar_t / alpha_bar_prev,
which is also what makes strided (fewer-step) sampling work.

Variable name -> paper symbol (Ho et al. 2020):
    alpha_bar_t    -> alpha-bar_t           x0_hat  -> x-hat_0 (Eq. 15)
    alpha_bar_prev -> alpha-bar_{t-1}       eps_hat -> epsilon_theta(x_t, t)
    beta_t         -> beta_t = 1 - alpha-bar_t / alpha-bar_{t-1}
"""

from __future__ import annotations

import torch

from dlearn.checks import integer_in
from dlearn.distributions import append_dims
from dlearn.train import show_progress

PREDICTION_TYPES = ("eps", "x0", "v")
VARIANCE_TYPES = ("fixed_small", "fixed_large")


def q_sample(x0: torch.Tensor, alpha_bar_t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0) by reparameterisation (Ho et al. 2020, Eq. 4; Luo eq. 70).

        x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps

    Args:
        x0: clean data, shape (B, ...).
        alpha_bar_t: cumulative signal variance per example, shape (B,) or a scalar.
        eps: standard normal noise, shape of x0. Passed in, so callers control randomness.
    """
    if eps.shape != x0.shape:
        raise ValueError(f"eps must have x0's shape {tuple(x0.shape)}, got {tuple(eps.shape)}")
    a = append_dims(alpha_bar_t, x0.ndim)
    return a**0.5 * x0 + (1 - a) ** 0.5 * eps


def velocity(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """The v-prediction target v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022)."""
    a = append_dims(alpha_bar_t, x0.ndim)
    return a**0.5 * eps - (1 - a) ** 0.5 * x0


def predict_x0_eps(x_t: torch.Tensor, out: torch.Tensor, alpha_bar_t, prediction_type: str = "eps"):
    """Turn a network output into (x0_hat, eps_hat), for any of the three parameterisations.

    "eps": x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)                   (Luo eq. 115)
    "x0":  eps = (x_t - sqrt(a) x0) / sqrt(1 - a)
    "v":   x0 = sqrt(a) x_t - sqrt(1 - a) v,  eps = sqrt(a) v + sqrt(1 - a) x_t
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be 'eps', 'x0' or 'v', got {prediction_type!r}")
    if out.shape != x_t.shape:
        raise ValueError(f"the network output must have x_t's shape {tuple(x_t.shape)}, got {tuple(out.shape)}")
    a = append_dims(alpha_bar_t, x_t.ndim)
    b = 1 - a
    if prediction_type == "eps":
        return (x_t - b ** (0.5) * out) / a ** (0.5), out
    if prediction_type == "x0":
        if (b == 0).any():
            raise ValueError("with x0-prediction, eps_hat is undefined at alpha_bar = 1 (x_t has no noise); use 'eps' or 'v'")
        return out, (x_t - a ** (0.5) * out) / b ** (0.5)
    return (a**0.5) * x_t - (b**0.5) * out, (a**0.5) * out + (b**0.5) * x_t


def posterior_mean_var(x0: torch.Tensor, x_t: torch.Tensor, alpha_bar_t, alpha_bar_prev):
    """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, Eqs. 6-7; Luo eq. 84).

        mu = sqrt(alpha_bar_prev) beta_t / (1 - alpha_bar_t) x0 + sqrt(1 - beta_t) (1 - alpha_bar_prev) / (1 - alpha_bar_t) x_t
        var = (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta_t,   beta_t = 1 - alpha_bar_t / alpha_bar_prev

    Returns:
        (mean, variance), the variance per example with x0's number of dimensions.
    """
    a_t, a_p = append_dims(alpha_bar_t, x0.ndim), append_dims(alpha_bar_prev, x0.ndim)
    one_minus_beta = a_t / a_p
    beta_t = 1 - one_minus_beta
    mean = (a_p ** (0.5) * beta_t) / (1 - a_t) * x0 + one_minus_beta ** (0.5) * (1 - a_p) / (1 - a_t) * x_t
    var = torch.clamp((1 - a_p) / (1 - a_t) * beta_t, min=1e-20)
    return mean, var


def next_in_schedule(timestep: int, timesteps: torch.Tensor | None = None) -> int:
    """The step after `timestep` in a sampling run: the next entry of `timesteps`, or timestep - 1 (-1 at the end)."""
    if timesteps is None:
        return timestep - 1
    idx = (timesteps == timestep).nonzero()
    if len(idx) == 0:
        raise ValueError(f"timestep {timestep} is not one of the sampler's timesteps {timesteps.tolist()}")
    i = int(idx[0, 0])
    return int(timesteps[i + 1]) if i + 1 < len(timesteps) else -1


def ddpm_step(
    alpha_bar: torch.Tensor,
    timestep: int,
    x_t: torch.Tensor,
    out: torch.Tensor,
    prediction_type: str = "eps",
    clip: bool = True,
    variance_type: str = "fixed_small",
    noise: torch.Tensor | None = None,
    prev_timestep: int | None = None,
):
    """One ancestral step x_t -> x_{t-1} ~ p_theta(x_{t-1} | x_t) (Ho et al. 2020, Algorithm 2).

    Steps:
      1. alpha_bar at t and at the previous step (1 past the end);
      2. x0_hat from the network output, clipped to [-1, 1] if `clip`;
      3. the posterior mean mu(x0_hat, x_t) (Eq. 7);
      4. add sqrt(var) * noise when t > 0, var = beta-tilde_t ("fixed_small") or beta_t ("fixed_large").

    Args:
        alpha_bar: the schedule, shape (T,).
        timestep: the current integer step t (0..T-1).
        x_t, out: the current sample and the network's output at it, same shape.
        noise: standard normal noise for step 4 (required when timestep > 0).
        prev_timestep: the step to go to (default timestep - 1; strided sampling passes its next step).

    Returns:
        (x_prev, x0_hat).
    """
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    integer_in("timestep", timestep, 0, len(alpha_bar) - 1)  # -1 would wrap around to the last alpha_bar
    prev = timestep - 1 if prev_timestep is None else prev_timestep
    integer_in("prev_timestep", prev, -1, timestep - 1)
    a_t = alpha_bar[timestep]
    a_p = alpha_bar[prev] if prev >= 0 else torch.tensor(1.0, dtype=alpha_bar.dtype)
    x0_hat, _ = predict_x0_eps(x_t, out, a_t, prediction_type)
    if clip:
        x0_hat = x0_hat.clamp(-1, 1)
    mean, var = posterior_mean_var(x0_hat, x_t, a_t, a_p)
    if timestep > 0:
        if noise is None:
            raise ValueError("ddpm_step needs noise for timestep > 0 (pass torch.randn(x_t.shape, generator=...))")
        if variance_type == "fixed_large":
            var = 1 - a_t / a_p
        mean = mean + var ** (0.5) * noise
    return mean, x0_hat


@torch.no_grad()
def sample(
    model_fn,
    x_T: torch.Tensor,
    alpha_bar: torch.Tensor,
    timesteps: torch.Tensor | None = None,
    prediction_type: str = "eps",
    clip: bool = True,
    variance_type: str = "fixed_small",
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    progress: bool | None = None,
):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2): x_T -> x_0 through `ddpm_step`.

    Args:
        model_fn: (x_t, timestep tensor (B,)) -> network output, shape of x_t.
        x_T: the starting noise, shape (B, ...).
        alpha_bar: the schedule, shape (T,).
        timesteps: the decreasing steps to visit (default all, T-1..0); fewer gives strided sampling.
        generator: seeds the noise of every step (drawn only for timestep > 0, as diffusers does).

    Returns:
        x_0, or (x_0, trajectory of shape (steps + 1, B, ...)) with `return_trajectory`.
    """
    from tqdm.auto import tqdm

    if timesteps is None:
        timesteps = torch.arange(len(alpha_bar) - 1, -1, -1)
    if len(timesteps) == 0:
        raise ValueError("timesteps should hold at least one step, got none (the sampler would return x_T unchanged)")
    x = x_T
    path = [x] if return_trajectory else None
    for i, t in enumerate(tqdm(timesteps.tolist(), disable=not show_progress(progress), leave=False)):
        out = model_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device) if t > 0 else None
        prev = int(timesteps[i + 1]) if i + 1 < len(timesteps) else -1
        x, _ = ddpm_step(alpha_bar, t, x, out, prediction_type, clip, variance_type, noise, prev_timestep=prev)
        if return_trajectory:
            path.append(x)
    return (x, torch.stack(path)) if return_trajectory else x
