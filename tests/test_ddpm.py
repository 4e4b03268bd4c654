"""Chapter 05's DDPM step against diffusers' DDPMScheduler, and the forward process against closed forms."""

import itertools

import pytest
import torch
from diffusers import DDPMScheduler

from dlearn import ddpm, schedules

PTYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SCHED = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)


@pytest.mark.parametrize(
    "schedule,ptype,clip,variance_type",
    list(itertools.product(["linear", "cosine"], ["eps", "x0", "v"], [True, False], ["fixed_small", "fixed_large"])),
)
def test_ddpm_step_matches_diffusers(schedule, ptype, clip, variance_type):
    ref = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule=SCHED[schedule],
        prediction_type=PTYPES[ptype],
        clip_sample=clip,
        variance_type=variance_type,
    )
    alpha_bar = schedules.alpha_bar_from_betas(schedules.make_betas(schedule, 1000))
    x_t, out, noise = _inputs()
    for t in (999, 500, 37, 1, 0):
        g = torch.Generator().manual_seed(t)
        expected = ref.step(out, t, x_t, generator=g)
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t))  # diffusers draws the same
        prev, x0_hat = ddpm.ddpm_step(alpha_bar, t, x_t, out, ptype, clip, variance_type, noise=noise if t > 0 else None)
        assert (prev - expected.prev_sample).abs().max() <= 1e-5
        assert (x0_hat - expected.pred_original_sample).abs().max() <= 1e-5


def test_strided_ddpm_matches_diffusers():
    ref = DDPMScheduler(num_train_timesteps=1000)
    ref.set_timesteps(20)
    alpha_bar = schedules.alpha_bar_from_betas(schedules.linear_betas(1000))
    x_t, out, _ = _inputs(1)
    for t in ref.timesteps.tolist():
        expected = ref.step(out, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        prev_t = ddpm.next_in_schedule(t, ref.timesteps)
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t)) if t > 0 else None
        got, _ = ddpm.ddpm_step(alpha_bar, t, x_t, out, noise=noise, prev_timestep=prev_t)
        assert (got - expected).abs().max() <= 1e-5


def test_q_sample_and_velocity_match_diffusers():
    ref = DDPMScheduler(num_train_timesteps=1000)
    x0, eps, _ = _inputs(2)
    t = torch.tensor([0, 10, 500, 999])
    a = ref.alphas_cumprod[t]
    torch.testing.assert_close(ddpm.q_sample(x0, a, eps), ref.add_noise(x0, eps, t), rtol=0, atol=1e-6)
    torch.testing.assert_close(ddpm.velocity(x0, eps, a), ref.get_velocity(x0, eps, t), rtol=0, atol=1e-6)


def test_parameterisations_invert_each_other():
    x0, eps, _ = _inputs(3)
    a = torch.tensor([0.9, 0.5, 0.1, 0.01]).double()
    x0, eps = x0.double(), eps.double()
    x_t = ddpm.q_sample(x0, a, eps)
    for ptype, target in (("eps", eps), ("x0", x0), ("v", ddpm.velocity(x0, eps, a))):
        x0_hat, eps_hat = ddpm.predict_x0_eps(x_t, target, a, ptype)
        torch.testing.assert_close(x0_hat, x0, atol=1e-12, rtol=0)
        torch.testing.assert_close(eps_hat, eps, atol=1e-12, rtol=0)


def test_posterior_by_gaussian_conditioning():
    """q(x_{t-1} | x_t, x_0) from the joint Gaussian of (x_{t-1}, x_t) given x_0 (one dimension, float64)."""
    alpha_bar = schedules.alpha_bar_from_betas(schedules.linear_betas(1000).double())
    for t in (1, 10, 500, 999):
        a_t, a_p = alpha_bar[t], alpha_bar[t - 1]
        one_minus_beta = a_t / a_p
        x0, x_t = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[-0.7]], dtype=torch.float64)
        # joint: x_{t-1} = sqrt(a_p) x0 + ..., var 1 - a_p; cov(x_{t-1}, x_t) = sqrt(one_minus_beta) (1 - a_p)
        gain = one_minus_beta.sqrt() * (1 - a_p) / (1 - a_t)
        mean = a_p.sqrt() * x0 + gain * (x_t - a_t.sqrt() * x0)
        var = (1 - a_p) - gain * one_minus_beta.sqrt() * (1 - a_p)
        got_mean, got_var = ddpm.posterior_mean_var(x0, x_t, a_t, a_p)
        torch.testing.assert_close(got_mean, mean, atol=1e-12, rtol=0)
        torch.testing.assert_close(got_var.reshape(()), var, atol=1e-12, rtol=1e-10)


def test_bad_input():
    alpha_bar = schedules.alpha_bar_from_betas(schedules.linear_betas(10))
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="'eps', 'x0' or 'v'"):
        ddpm.predict_x0_eps(x, x, 0.5, "epsilon")
    with pytest.raises(ValueError, match="shape"):
        ddpm.predict_x0_eps(x, torch.zeros(2, 4), 0.5)
    with pytest.raises(ValueError, match="needs noise"):
        ddpm.ddpm_step(alpha_bar, 5, x, x)
    with pytest.raises(ValueError, match="variance_type"):
        ddpm.ddpm_step(alpha_bar, 0, x, x, variance_type="learned")
    with pytest.raises(ValueError, match="not one of"):
        ddpm.next_in_schedule(7, torch.tensor([9, 5, 1]))
    with pytest.raises(ValueError, match="eps must have"):
        ddpm.q_sample(x, 0.5, torch.zeros(3))


def _ab64():
    return schedules.alpha_bar_from_betas(schedules.linear_betas(1000).double())


def test_check_P2_digits_diffused_to_T_are_standard_normal():
    import scipy.stats

    from dlearn import datasets

    x0 = datasets.digits("all", form="unit")[0].reshape(-1, 64).double()
    ab = _ab64()
    assert ab[-1].item() == pytest.approx(4.04e-5, rel=0.01)
    g = torch.Generator().manual_seed(0)
    x_t = ddpm.q_sample(x0, ab[-1], torch.randn(x0.shape, generator=g, dtype=torch.float64))
    pvals = [scipy.stats.kstest(x_t[:, j].numpy(), "norm").pvalue for j in range(64)]
    # under the null each p > 0.05 with probability 0.95; 10 or more failures of 64 has probability < 0.01
    assert sum(p > 0.05 for p in pvals) >= 55


def test_check_P4_sampler_shapes_and_determinism():
    ab = schedules.alpha_bar_from_betas(schedules.linear_betas(50))
    model_fn = lambda x, t: 0.1 * x  # noqa: E731
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a, path = ddpm.sample(model_fn, x_T, ab, generator=torch.Generator().manual_seed(1), return_trajectory=True, progress=False)
    b = ddpm.sample(model_fn, x_T, ab, generator=torch.Generator().manual_seed(1), progress=False)
    assert a.shape == x_T.shape and path.shape == (51, 3, 1, 8, 8) and torch.equal(a, b)
    c = ddpm.sample(model_fn, x_T, ab, generator=torch.Generator().manual_seed(2), progress=False)
    assert not torch.equal(a, c)


def test_check_P5_which_fixed_variance():
    """Point-mass data x0 = c with the exact noise: the beta-tilde sampler's x_t has the true spread of
    q(x_t | x0) = N(sqrt(a) c, 1 - a); beta_t overshoots it (beta-tilde is the optimal choice for a
    deterministic x0, beta_t for x0 ~ N(0, I): Ho et al. 2020, Sec. 3.2)."""
    ab = _ab64()
    c = 0.3
    eps_star = lambda x, t: (x - ab[t].sqrt().reshape(-1, 1) * c) / (1 - ab[t]).sqrt().reshape(-1, 1)  # noqa: E731
    x_T = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spread = {}
    for variance_type in ("fixed_small", "fixed_large"):
        x0, path = ddpm.sample(eps_star, x_T, ab, clip=False, variance_type=variance_type,
                               generator=torch.Generator().manual_seed(1), return_trajectory=True, progress=False)  # fmt: skip
        assert (x0 - c).abs().max() < 1e-6  # the last step returns x0_hat, exact here
        spread[variance_type] = path[-2].std().item()  # the level of alpha_bar[0]
    true = (1 - ab[0]).sqrt().item()
    assert abs(spread["fixed_small"] / true - 1) < 0.05
    assert spread["fixed_large"] > 1.2 * true


def test_check_P6_posterior_coefficients_in_both_notations():
    betas = schedules.linear_betas(1000).double()
    ab = _ab64()
    for t in (1, 10, 500, 999):
        one, zero = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
        c_x0 = ddpm.posterior_mean_var(one, zero, ab[t], ab[t - 1])[0].item()
        c_xt = ddpm.posterior_mean_var(zero, one, ab[t], ab[t - 1])[0].item()
        # DDPM eq. 7 with the schedule's own beta_t and 1 - beta_t
        assert c_x0 == pytest.approx((ab[t - 1].sqrt() * betas[t] / (1 - ab[t])).item(), rel=1e-10)
        assert c_xt == pytest.approx(((1 - betas[t]).sqrt() * (1 - ab[t - 1]) / (1 - ab[t])).item(), rel=1e-10)


def test_check_P8_ancestral_sampling_with_the_exact_noise_recovers_the_mixture():
    from dlearn import toys

    mix = toys.mixture_2d()
    ab = _ab64()
    eps_star = lambda x, t: mix.eps_star(x, ab[t])  # noqa: E731
    x_T = torch.randn(10_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = ddpm.sample(eps_star, x_T, ab, clip=False, generator=torch.Generator().manual_seed(1), progress=False)
    labels = mix.class_posterior(x0).argmax(1)
    for k in range(3):
        assert abs((labels == k).double().mean().item() - 1 / 3) < 0.02
        assert (x0[labels == k].mean(0) - mix.means[k]).abs().max() < 0.05


def test_check_P9_ddpm_eq12_weight_is_luo_eq130():
    from dlearn import vdm

    betas = schedules.linear_betas(1000).double()
    ab = _ab64()
    a_t, a_p, beta = ab[1:], ab[:-1], betas[1:]
    sigma2 = vdm.posterior_variance(a_t, a_p)
    ddpm_weight = beta**2 / (2 * sigma2 * (1 - beta) * (1 - a_t))
    torch.testing.assert_close(ddpm_weight, vdm.eps_loss_weight(a_t, a_p), rtol=1e-9, atol=0)
