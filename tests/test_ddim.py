"""Chapter 05's DDIM step and inversion against diffusers' DDIMScheduler and DDIMInverseScheduler."""

import itertools

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler

from dlearn import ddim, ddpm, schedules

PTYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SCHED = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 1, 8, 8, generator=g) for _ in range(3)]


@pytest.mark.parametrize(
    "schedule,ptype,eta,spacing,clip",
    list(
        itertools.product(
            ["linear", "cosine"], ["eps", "x0", "v"], [0.0, 0.5, 1.0], ["leading", "trailing", "linspace"], [False, True]
        )
    ),
)
def test_ddim_step_matches_diffusers(schedule, ptype, eta, spacing, clip):
    ref = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule=SCHED[schedule],
        prediction_type=PTYPES[ptype],
        clip_sample=clip,
        timestep_spacing=spacing,
    )
    alpha_bar = schedules.alpha_bar_from_betas(schedules.make_betas(schedule, 1000))
    x_t, out, noise = _inputs()
    for n in (3, 10, 50):
        ref.set_timesteps(n)
        assert torch.equal(ref.timesteps, schedules.inference_timesteps(1000, n, spacing))
        for t in ref.timesteps.tolist():
            expected = ref.step(out, t, x_t, eta=eta, variance_noise=noise if eta > 0 else None)
            prev_t = ddim.strided_previous_timestep(t, 1000, n)
            got, x0_hat = ddim.ddim_step(alpha_bar, t, prev_t, x_t, out, ptype, eta, clip, noise=noise)
            assert (got - expected.prev_sample).abs().max() <= 1e-5
            assert (x0_hat - expected.pred_original_sample).abs().max() <= 1e-5


def test_sd_style_final_alpha_bar():
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    ref.set_timesteps(10)
    alpha_bar = schedules.alpha_bar_from_betas(schedules.scaled_linear_betas(1000))
    assert torch.equal(ref.timesteps, schedules.inference_timesteps(1000, 10, "leading", steps_offset=1))
    x_t, out, _ = _inputs(1)
    t = int(ref.timesteps[-1])  # the last step lands below 0: final alpha_bar = alpha_bar[0]
    expected = ref.step(out, t, x_t).prev_sample
    prev = ddim.strided_previous_timestep(t, 1000, 10)
    got, _ = ddim.ddim_step(alpha_bar, t, prev, x_t, out, final_alpha_bar=float(alpha_bar[0]))
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("ptype,spacing", list(itertools.product(["eps", "x0", "v"], ["leading", "trailing"])))
def test_inverse_step_matches_diffusers(ptype, spacing):
    ref = DDIMInverseScheduler(
        num_train_timesteps=1000, prediction_type=PTYPES[ptype], clip_sample=False, timestep_spacing=spacing
    )
    alpha_bar = schedules.alpha_bar_from_betas(schedules.linear_betas(1000))
    x, out, _ = _inputs(2)
    for n in (10, 50):
        ref.set_timesteps(n)
        for t in ref.timesteps.tolist():
            expected = ref.step(out, t, x).prev_sample
            if ptype == "x0" and t - 1000 // n < 0:  # the first step starts at alpha_bar = 1: eps is 0/0
                assert not torch.isfinite(expected).all()  # diffusers passes infinities on ...
                with pytest.raises(ValueError, match="undefined at alpha_bar = 1"):  # ... the book refuses
                    ddim.ddim_inverse_step(alpha_bar, t, 1000, n, x, out, ptype)
                continue
            got, _ = ddim.ddim_inverse_step(alpha_bar, t, 1000, n, x, out, ptype)
            assert (got - expected).abs().max() <= 1e-5


def test_ddim_eta_one_over_all_steps_is_ddpm():
    """With eta = 1 and every step, DDIM's update is DDPM's posterior sample (Song et al. 2021, Sec. 4.1)."""
    alpha_bar = schedules.alpha_bar_from_betas(schedules.linear_betas(1000).double())
    x_t, out, noise = (t.double() for t in _inputs(3))
    for t in (999, 500, 10, 1):
        a, _ = ddim.ddim_step(alpha_bar, t, t - 1, x_t, out, eta=1.0, noise=noise)
        b, _ = ddpm.ddpm_step(alpha_bar, t, x_t, out, clip=False, noise=noise)
        assert (a - b).abs().max() < 1e-10  # float64: the same maths arranged differently


def test_inversion_round_trip_is_exact_when_eps_does_not_depend_on_x():
    alpha_bar = schedules.alpha_bar_from_betas(schedules.linear_betas(1000).double())
    x0 = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    eps = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    n = 20
    up = schedules.inference_timesteps(1000, n, "leading").flip(0)
    x = x0
    for t in up.tolist():
        x, _ = ddim.ddim_inverse_step(alpha_bar, t, 1000, n, x, eps)
    for t in up.flip(0).tolist():
        x, _ = ddim.ddim_step(alpha_bar, t, ddim.strided_previous_timestep(t, 1000, n), x, eps)
    torch.testing.assert_close(x, x0, atol=1e-10, rtol=0)


def test_diffusers_ddpm_and_ddim_share_the_schedule():
    assert torch.equal(DDPMScheduler().alphas_cumprod, DDIMScheduler().alphas_cumprod)


def test_bad_eta():
    alpha_bar = schedules.alpha_bar_from_betas(schedules.linear_betas(10))
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="eta"):
        ddim.ddim_step(alpha_bar, 5, 4, x, x, eta=-0.1)
    with pytest.raises(ValueError, match="needs noise"):
        ddim.ddim_step(alpha_bar, 5, 4, x, x, eta=0.5)


def test_ddim_sampler_with_the_exact_noise_recovers_the_mixture():
    from dlearn import toys

    mix = toys.mixture_2d()
    ab = schedules.alpha_bar_from_betas(schedules.linear_betas(1000).double())
    eps_star = lambda x, t: mix.eps_star(x, ab[t])  # noqa: E731
    x_T = torch.randn(6000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0, path = ddim.sample(eps_star, x_T, ab, num_inference_steps=50, return_trajectory=True, progress=False)
    assert path.shape == (51, 6000, 2)
    again = ddim.sample(eps_star, x_T, ab, num_inference_steps=50, progress=False)
    assert torch.equal(x0, again)  # eta = 0: deterministic
    labels = mix.class_posterior(x0).argmax(1)
    for k in range(3):
        assert abs((labels == k).double().mean().item() - 1 / 3) < 0.03
        assert (x0[labels == k].mean(0) - mix.means[k]).abs().max() < 0.1


def test_the_benchmark_runs_and_compares_equal_work():
    from dlearn import bench

    res = bench.bench_ddim(num_steps=3, batch=4, repeats=1)
    assert set(res) == {"book_s_per_step", "diffusers_s_per_step", "ratio_book_over_diffusers"}
    assert all(v > 0 for v in res.values())
