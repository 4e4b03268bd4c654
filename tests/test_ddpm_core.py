"""DDPM's two algorithms written out from the paper (Ho et al. 2020) are the library's loss and sampler.

Chapter 05 shows the same ~30 lines inline; these tests keep the library honest against them on the
same random draws: Algorithm 1 (t, eps, x_t by eq. 4, the simple loss of eq. 14) against
`diffusion.training_loss`, and Algorithm 2 (eq. 11, sigma_t^2 = beta-tilde_t or beta_t) against
`ddpm.sample` and `diffusion.generate`.
"""

import pytest
import torch

from dlearn import ddpm, diffusion, schedules


def algorithm1_loss(model, x0, generator, target="eps"):
    """Algorithm 1, lines 2-5, written from the paper (t counted from 0)."""
    t = torch.randint(0, model.num_steps, (len(x0),), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    a = model.alpha_bar[t].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps  # eq. 4
    wanted = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[target]
    return ((wanted - model(x_t, t)) ** 2).mean()


@torch.no_grad()
def algorithm2(eps_model, x_T, alpha_bar, generator, variance="beta_tilde", clip=False):
    """Algorithm 2: eq. 11 (or, with `clip`, the posterior mean of the clipped x0_hat), T steps."""
    x = x_T
    for t in range(len(alpha_bar) - 1, -1, -1):
        a_t = alpha_bar[t]
        a_prev = alpha_bar[t - 1] if t > 0 else torch.ones_like(a_t)
        beta_t = 1 - a_t / a_prev
        eps_hat = eps_model(x, torch.full((len(x),), t))
        if clip:
            x0_hat = ((x - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()).clamp(-1, 1)
            mean = a_prev.sqrt() * beta_t / (1 - a_t) * x0_hat + (1 - beta_t).sqrt() * (1 - a_prev) / (1 - a_t) * x
        else:
            mean = (x - beta_t / (1 - a_t).sqrt() * eps_hat) / (1 - beta_t).sqrt()  # eq. 11
        if t > 0:
            var = (1 - a_prev) / (1 - a_t) * beta_t if variance == "beta_tilde" else beta_t
            x = mean + var.sqrt() * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        else:
            x = mean
    return x


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_training_loss_is_algorithm1(prediction_type):
    torch.manual_seed(0)
    model = diffusion.DigitsDDPM(prediction_type, num_steps=100, channels=(8, 16), dropout=0.0)
    x0 = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ours = algorithm1_loss(model, x0, torch.Generator().manual_seed(2), prediction_type)
    theirs = diffusion.training_loss(model, x0, torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0.0)


def test_training_loss_moves_with_the_draws():
    """The oracle is not trivially equal: another generator seed gives another loss."""
    torch.manual_seed(0)
    model = diffusion.DigitsDDPM("eps", num_steps=100, channels=(8, 16), dropout=0.0)
    x0 = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    a = diffusion.training_loss(model, x0, torch.Generator().manual_seed(2))
    b = diffusion.training_loss(model, x0, torch.Generator().manual_seed(3))
    assert (a - b).abs() > 1e-4


@pytest.mark.parametrize(("variance", "variance_type"), [("beta_tilde", "fixed_small"), ("beta", "fixed_large")])
def test_ddpm_sample_is_algorithm2(variance, variance_type):
    """Unclipped, `ddpm.sample`'s posterior-mean form is eq. 11 to float64 rounding, with either fixed variance."""
    alpha_bar = schedules.alpha_bar_from_betas(schedules.linear_betas(200)).double()
    eps_model = lambda x, t: 0.3 * x + 0.1 * torch.sin(x) * alpha_bar[t].reshape(-1, 1)  # any smooth (B, 2) -> (B, 2)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = algorithm2(eps_model, x_T, alpha_bar, torch.Generator().manual_seed(1), variance)
    theirs = ddpm.sample(eps_model, x_T, alpha_bar, clip=False, variance_type=variance_type,
                         generator=torch.Generator().manual_seed(1), progress=False)  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_generate_ancestral_is_clipped_algorithm2():
    """`diffusion.generate(..., "ancestral")` draws x_T then each step's noise from one seeded generator."""
    torch.manual_seed(0)
    model = diffusion.DigitsDDPM("eps", num_steps=50, channels=(8, 16)).eval()
    gen = torch.Generator().manual_seed(4)
    ours = algorithm2(model, torch.randn((6, 1, 8, 8), generator=gen), model.alpha_bar, gen, clip=True)
    theirs = diffusion.generate(model, 6, "ancestral", model.num_steps, seed=4, progress=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    gen = torch.Generator().manual_seed(4)
    unclipped = algorithm2(model, torch.randn((6, 1, 8, 8), generator=gen), model.alpha_bar, gen, clip=False)
    assert not torch.allclose(unclipped, theirs, atol=1e-3)  # clipping matters here, so the comparison above has teeth
