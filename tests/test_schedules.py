"""Chapter 04's schedules against diffusers' own (exact) and the constants their papers give."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dlearn import schedules

DIFFUSERS_NAMES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear"}


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_alpha_bar_matches_diffusers_exactly(name):
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_NAMES[name])
    betas = schedules.make_betas(name, 1000)
    assert torch.equal(betas, ref.betas)
    assert torch.equal(schedules.alpha_bar_from_betas(betas), ref.alphas_cumprod)


def test_scaled_linear_matches_stable_diffusion_config():
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.equal(schedules.scaled_linear_betas(1000), ref.betas)


def test_reference_constants():
    lin = schedules.alpha_bar_from_betas(schedules.linear_betas(1000).double())
    assert lin[-1].item() == pytest.approx(4.04e-5, rel=0.01)
    s = schedules.snr(lin)
    assert s[0].item() == pytest.approx(9999, rel=1e-6) and (s[1:] < s[:-1]).all()
    cos = schedules.alpha_bar_from_betas(schedules.cosine_betas(1000))
    assert cos[0].item() == pytest.approx(0.999959, abs=1e-6) and cos[-1].item() < 1e-8
    torch.testing.assert_close(schedules.logsnr(lin), torch.log(s))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [3, 10, 50, 1000])
def test_timesteps_match_diffusers(spacing, n):
    ref = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    ref.set_timesteps(n)
    assert torch.equal(schedules.inference_timesteps(1000, n, spacing), ref.timesteps)


def test_bad_input():
    with pytest.raises(ValueError, match="schedule must be"):
        schedules.make_betas("sigmoid")
    with pytest.raises(ValueError, match="spacing"):
        schedules.inference_timesteps(1000, 10, "middle")
    with pytest.raises(ValueError, match="1..1000"):
        schedules.inference_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="positive integer"):
        schedules.linear_betas(0)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        schedules.alpha_bar_from_betas(torch.tensor([0.5, 1.0]))
