"""Chapter 05: DDIM, the deterministic (eta = 0) and stochastic sampler, and its inversion.

    x_prev = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma^2) eps_hat + sigma noise,
    sigma  = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev)

(Song et al. 2021, Eq. 12 and 16.) Matches diffusers' `DDIMScheduler.step` and
`DDIMInverseScheduler.step` exactly, including its rule that the previous step is always
t - T // N whatever the timestep spacing (which is off by one for some spacings; see
`strided_previous_timestep`).
"""

from __future__ import annotations

import torch

from dlearn.checks import integer_in, number_in
from dlearn.ddpm import predict_x0_eps
from dlearn.schedules import inference_timesteps
from dlearn.train import show_progress


def strided_previous_timestep(timestep: int, num_train_steps: int, num_inference_steps: int) -> int:
    """diffusers' DDIM rule: t - T // N (not the next entry of the schedule's timesteps)."""
    return timestep - num_train_steps // num_inference_steps


def ddim_step(
    alpha_bar: torch.Tensor,
    timestep: int,
    prev_timestep: int,
    x_t: torch.Tensor,
    out: torch.Tensor,
    prediction_type: str = "eps",
    eta: float = 0.0,
    clip: bool = False,
    noise: torch.Tensor | None = None,
    final_alpha_bar: float = 1.0,
):
    """One DDIM step x_t -> x_prev.

    Steps:
      1. alpha_bar at t and at prev (`final_alpha_bar` past the end: 1, or alpha_bar[0] for SD's
         set_alpha_to_one=False);
      2. (x0_hat, eps_hat) from the output; x0_hat clipped if `clip` (eps_hat is not recomputed, as in diffusers);
      3. sigma from eta (Eq. 16); x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat;
      4. plus sigma * noise when eta > 0.

    `eta` must be in [0, 1] (0: DDIM, 1: DDPM's variance); `timestep` in 0..T-1 and `prev_timestep` below it.

    Returns:
        (x_prev, x0_hat).
    """
    number_in("eta", eta, 0.0, 1.0)
    integer_in("timestep", timestep, 0, len(alpha_bar) - 1)
    integer_in("prev_timestep", prev_timestep, -len(alpha_bar), timestep - 1)
    a_t = alpha_bar[timestep]
    a_p = alpha_bar[prev_timestep] if prev_timestep >= 0 else torch.tensor(final_alpha_bar, dtype=alpha_bar.dtype)
    x0_hat, eps_hat = predict_x0_eps(x_t, out, a_t, prediction_type)
    if clip:
        x0_hat = x0_hat.clamp(-1, 1)
    variance = ((1 - a_p) / (1 - a_t)) * (1 - a_t / a_p)
    sigma = eta * variance ** (0.5)
    x_prev = a_p ** (0.5) * x0_hat + (1 - a_p - sigma**2) ** (0.5) * eps_hat
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        x_prev = x_prev + sigma * noise
    return x_prev, x0_hat


def ddim_inverse_step(
    alpha_bar: torch.Tensor,
    timestep: int,
    num_train_steps: int,
    num_inference_steps: int,
    x: torch.Tensor,
    out: torch.Tensor,
    prediction_type: str = "eps",
    clip: bool = False,
    initial_alpha_bar: float = 1.0,
):
    """One step of DDIM inversion: from the level below `timestep` up to `timestep` (eta = 0, run backwards).

    The source level is min(timestep - T // N, T - 1), with `initial_alpha_bar` below 0 (diffusers'
    `DDIMInverseScheduler.step`, whose timesteps run upwards). The network output `out` is evaluated at
    the *source* point: reusing eps(x_src) for eps(x_target) is the approximation that makes inversion
    inexact, which null-text inversion (chapter 10) corrects.

    Returns:
        (x at `timestep`, x0_hat).
    """
    src = min(timestep - num_train_steps // num_inference_steps, num_train_steps - 1)
    a_s = alpha_bar[src] if src >= 0 else torch.tensor(initial_alpha_bar, dtype=alpha_bar.dtype)
    x0_hat, eps_hat = predict_x0_eps(x, out, a_s, prediction_type)
    if clip:
        x0_hat = x0_hat.clamp(-1, 1)
    a_t = alpha_bar[timestep]
    return a_t ** (0.5) * x0_hat + (1 - a_t) ** (0.5) * eps_hat, x0_hat


@torch.no_grad()
def sample(
    model_fn,
    x_T: torch.Tensor,
    alpha_bar: torch.Tensor,
    num_inference_steps: int = 50,
    spacing: str = "leading",
    prediction_type: str = "eps",
    eta: float = 0.0,
    clip: bool = False,
    generator: torch.Generator | None = None,
    final_alpha_bar: float = 1.0,
    return_trajectory: bool = False,
    progress: bool | None = None,
):
    """DDIM sampling with `num_inference_steps` steps (Song et al. 2021, Eq. 12); eta = 0 is deterministic.

    Args:
        model_fn: (x_t, timestep tensor (B,)) -> network output, shape of x_t.

    Returns:
        x_0, or (x_0, trajectory (steps + 1, B, ...)) with `return_trajectory`.
    """
    from tqdm.auto import tqdm

    num_train = len(alpha_bar)
    x = x_T
    path = [x] if return_trajectory else None
    for t in tqdm(
        inference_timesteps(num_train, num_inference_steps, spacing).tolist(), disable=not show_progress(progress), leave=False
    ):
        out = model_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device) if eta > 0 else None
        prev = strided_previous_timestep(t, num_train, num_inference_steps)
        x, _ = ddim_step(alpha_bar, t, prev, x, out, prediction_type, eta, clip, noise, final_alpha_bar)
        if return_trajectory:
            path.append(x)
    return (x, torch.stack(path)) if return_trajectory else x
