"""Chapter 06: Tweedie's formula, the three targets, score matching, Langevin dynamics, the probability-flow
ODE (rows S1-S14; S3, S4, S6, S7 and S10 are identity checks: true by algebra or definition, they
test the code)."""

import math

import pytest
import torch

from dlearn import ddim, ddpm, metrics, schedules, score, toys, vdm


def _ab64():
    return schedules.alpha_bar_from_betas(schedules.linear_betas(1000).double())


def _gmm_1d_log_prob(mu):
    w, m, s = torch.tensor([0.3, 0.7]), torch.tensor([-1.5, 1.0]), torch.tensor([0.4, 0.7])
    comps = torch.distributions.Normal(m.double(), s.double()).log_prob(mu.unsqueeze(-1)) + w.double().log()
    return torch.logsumexp(comps, -1)


def test_check_S1_tweedie_in_one_dimension_by_quadrature():
    z = torch.linspace(-5, 5, 201, dtype=torch.float64)
    grid = torch.linspace(-12, 12, 40_001, dtype=torch.float64)
    sigma = 0.8
    mean, s = score.tweedie_quadrature_1d(_gmm_1d_log_prob, z, sigma, grid)
    # the marginal of z is a mixture with variances s_k^2 + sigma^2: its score by autograd, independently
    zz = z.clone().requires_grad_(True)
    w, m, sd = torch.tensor([0.3, 0.7]), torch.tensor([-1.5, 1.0]), torch.tensor([0.4, 0.7])
    marginal = torch.distributions.Normal(m.double(), (sd.double() ** 2 + sigma**2).sqrt())
    comps = marginal.log_prob(zz.unsqueeze(-1)) + w.double().log()
    (exact_score,) = torch.autograd.grad(torch.logsumexp(comps, -1).sum(), zz)
    assert (s - exact_score).abs().max() < 1e-8
    assert (mean - score.tweedie_denoiser(z, exact_score, sigma**2)).abs().max() < 1e-8


def test_check_S2_tweedie_for_the_diffused_mixture_at_every_t():
    mix = toys.mixture_2d()
    ab = _ab64()
    x = 2 * torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    worst = 0.0
    for t in range(1000):
        worst = max(worst, (score.x0_from_score(x, mix.score(x, ab[t]), ab[t]) - mix.posterior_mean(x, ab[t])).abs().max().item())
    assert worst < 1e-10


def test_identity_check_S3_posterior_mean_in_score_form(gen):
    ab = _ab64()
    mix = toys.mixture_2d()
    x_t = torch.randn(50, 2, generator=gen, dtype=torch.float64)
    for t in (1, 300, 999):
        s = mix.score(x_t, ab[t])
        via_tweedie = ddpm.posterior_mean_var(score.x0_from_score(x_t, s, ab[t]), x_t, ab[t], ab[t - 1])[0]
        torch.testing.assert_close(score.posterior_mean_score_form(x_t, s, ab[t], ab[t - 1]), via_tweedie, rtol=1e-12, atol=1e-12)


def test_identity_check_S4_score_weight_is_the_eps_weight_rescaled(gen):
    ab = _ab64()
    a_t, a_p = ab[1:], ab[:-1]
    torch.testing.assert_close(score.score_loss_weight(a_t, a_p), vdm.eps_loss_weight(a_t, a_p) * (1 - a_t), rtol=1e-12, atol=0)
    eps, eps_hat = torch.randn(2, 999, 4, generator=gen, dtype=torch.float64)
    a = a_t[:, None]
    s, s_hat = score.score_from_eps(eps, a_t), score.score_from_eps(eps_hat, a_t)
    loss_s = score.score_loss_weight(a_t, a_p) * ((s_hat - s) ** 2).sum(1)
    loss_e = vdm.eps_loss_weight(a_t, a_p) * ((eps_hat - eps) ** 2).sum(1)
    assert a.shape[0] == 999
    torch.testing.assert_close(loss_s, loss_e, rtol=1e-10, atol=0)


def test_check_S5_the_score_is_minus_the_expected_noise_over_sigma(gen):
    mix = toys.mixture_2d()
    ab = _ab64()
    t = 300
    x0, _ = mix.sample(200_000, gen)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    x_t = ddpm.q_sample(x0, ab[t], eps)
    s = mix.score(x_t, ab[t])
    torch.testing.assert_close(mix.eps_star(x_t, ab[t]), -(1 - ab[t]).sqrt() * s, rtol=1e-9, atol=1e-10)
    slope = (eps * s).sum() / (s * s).sum()  # least squares of the sampled noise on the score
    assert abs(slope.item() / -(1 - ab[t]).sqrt().item() - 1) < 0.01


def test_identity_check_S6_the_score_points_against_the_noise(gen):
    mix = toys.mixture_2d()
    ab = _ab64()
    x0, _ = mix.sample(20_000, gen)
    for t in (10, 300, 700, 999):
        eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        x_t = ddpm.q_sample(x0, ab[t], eps)
        s = mix.score(x_t, ab[t])
        assert (s * -eps).sum(1).mean() > 0
    x = 2.5 * torch.randn(5000, 2, generator=gen, dtype=torch.float64)
    dist = lambda y: torch.cdist(y, mix.means).min(1).values.mean()  # noqa: E731
    assert dist(x + 0.05 * mix.score(x)) < dist(x)


def test_identity_check_S7_three_targets_give_identical_trajectories():
    mix = toys.mixture_2d()
    ab = _ab64()
    eps_fn = lambda x, t: mix.eps_star(x, ab[t])  # noqa: E731
    x0_fn = lambda x, t: score.x0_from_score(x, score.score_from_eps(mix.eps_star(x, ab[t]), ab[t]), ab[t])  # noqa: E731
    x_T = torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sampler in ("ddim", "ddpm"):
        runs = []
        for fn, ptype in ((eps_fn, "eps"), (x0_fn, "x0")):
            g = torch.Generator().manual_seed(1)
            if sampler == "ddim":
                runs.append(ddim.sample(fn, x_T, ab, 50, prediction_type=ptype, return_trajectory=True, progress=False)[1])
            else:
                kw = {"clip": False, "prediction_type": ptype, "generator": g, "return_trajectory": True, "progress": False}
                runs.append(ddpm.sample(fn, x_T, ab, **kw)[1])
        assert (runs[0] - runs[1]).abs().max() < 1e-10


def test_check_S8_denoising_and_explicit_score_matching_differ_by_a_constant(gen):
    mix = toys.mixture_2d()
    a = _ab64()[300]
    x0, _ = mix.sample(200_000, gen)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    x_t = ddpm.q_sample(x0, a, eps)
    true = mix.score(x_t, a)
    gaps = []
    candidates = {"exact": lambda y: mix.score(y, a), "half": lambda y: 0.5 * mix.score(y, a), "zero": torch.zeros_like}
    for name, fn in candidates.items():
        d = score.dsm_loss(fn, x0, a, eps) - score.esm_loss(fn, x_t, true)  # paired: the same x_t
        gaps.append((d.mean().item(), d.std().item() / math.sqrt(len(d)), name))
    c_exact = gaps[0][0]
    for mean, se, _ in gaps[1:]:
        assert abs(mean - c_exact) < 4 * math.hypot(se, gaps[0][1])
    # and the constant is E|grad log q(x_t | x0)|^2 - E|grad log q(x_t)|^2 > 0
    c = (score.conditional_score(x_t, x0, a) ** 2).sum(1).mean() - (true**2).sum(1).mean()
    assert abs(c_exact - c.item()) < 1e-6 * abs(c.item()) + 4 * gaps[0][1] and c > 0


def _unequal():
    mix = toys.mixture_2d()
    return toys.GaussianMixture(mix.means, mix.covs, torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64))


def _mode_shares(mix, x, seeds):
    return torch.stack([score.mode_weights(mix, b) for b in x.split(len(x) // seeds)])  # (seeds, modes)


def test_check_S9_S12_plain_langevin_gets_the_weights_wrong_and_annealing_recovers_them():
    mix = _unequal()
    seeds, n = [0, 1, 2], 1000
    x_init = torch.cat([8 * torch.rand(n, 2, generator=torch.Generator().manual_seed(k), dtype=torch.float64) - 4 for k in seeds])
    gens = lambda: [torch.Generator().manual_seed(1000 + k) for k in seeds]  # noqa: E731  one generator per seed
    plain = _mode_shares(mix, score.langevin(lambda x: mix.score(x), x_init, 0.01, 1000, gens()), 3)
    sigmas = torch.logspace(math.log10(3.0), math.log10(0.05), 10).tolist()  # 10 levels x 100 steps: the same budget
    smoothed = lambda x, s: score.smoothed(mix, s).score(x)  # noqa: E731
    ann = _mode_shares(mix, score.annealed_langevin(smoothed, x_init, sigmas, 100, 0.5 * 0.05**2, gens()), 3)
    se = lambda v: v.std(0) / math.sqrt(len(v))  # noqa: E731
    assert mix.weights[0] - plain.mean(0)[0] > max(2 * se(plain)[0], 0.1)  # S9: plain misses the heavy mode
    diff = ann[:, 0] - plain[:, 0]  # paired by seed
    assert diff.mean() > 2 * diff.std() / math.sqrt(3)
    assert (ann.mean(0) - mix.weights).abs().max() < 0.04  # 1000 chains per seed: a looser tolerance than the notebook's
    one = _mode_shares(mix, score.annealed_langevin(smoothed, x_init, [0.05], 1000, 0.5 * 0.05**2, gens()), 3)
    tv = lambda w: 0.5 * (w - mix.weights).abs().sum(1)  # noqa: E731
    d = tv(one) - tv(ann)  # S12: ten levels beat one, paired by seed
    assert d.mean() > 2 * d.std() / math.sqrt(3) and tv(ann).mean() < 0.05


def test_langevin_with_one_generator_per_seed_equals_separate_runs():
    mix = toys.mixture_2d()
    x = torch.randn(3 * 40, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    together = score.langevin(lambda y: mix.score(y), x, 0.01, 30, [torch.Generator().manual_seed(k) for k in range(3)])
    apart = [
        score.langevin(lambda y: mix.score(y), b, 0.01, 30, torch.Generator().manual_seed(k)) for k, b in enumerate(x.split(40))
    ]
    torch.testing.assert_close(together, torch.cat(apart), rtol=0, atol=1e-12)
    smoothed = lambda y, s: score.smoothed(mix, s).score(y)  # noqa: E731
    together = score.annealed_langevin(smoothed, x, [1.0, 0.1], 10, 1e-3, [torch.Generator().manual_seed(k) for k in range(3)])
    apart = [
        score.annealed_langevin(smoothed, b, [1.0, 0.1], 10, 1e-3, torch.Generator().manual_seed(k))
        for k, b in enumerate(x.split(40))
    ]
    torch.testing.assert_close(together, torch.cat(apart), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="multiple of 3"):
        score.langevin(lambda y: y, x[:10], 0.01, 2, [torch.Generator() for _ in range(3)])


def test_check_S13_fokker_planck_and_the_probability_flow_move_the_density_alike():
    """d p / d lambda (lambda = -log alpha_bar) against the SDE's Fokker-Planck side and the ODE's continuity side."""
    mix = toys.mixture_2d()
    g = torch.Generator().manual_seed(0)
    h1, h2 = 1e-5, 2e-4
    unit = torch.eye(2, dtype=torch.float64)
    div = lambda F, x: sum((F(x + h1 * e)[:, i] - F(x - h1 * e)[:, i]) / (2 * h1) for i, e in enumerate(unit))  # noqa: E731
    lap = lambda f, x: sum((f(x + h2 * e) - 2 * f(x) + f(x - h2 * e)) / h2**2 for e in unit)  # noqa: E731
    for a in (0.95, 0.4):
        lam = -math.log(a)
        dens = lambda y, lam=lam: mix.log_prob(y, math.exp(-lam)).exp()  # noqa: E731
        x0, _ = mix.sample(100, g)
        x = ddpm.q_sample(x0, torch.tensor(a, dtype=torch.float64), torch.randn(x0.shape, generator=g, dtype=torch.float64))
        dp = (dens(x, lam + h1) - dens(x, lam - h1)) / (2 * h1)
        flux = lambda y, drift, dens=dens: dens(y)[:, None] * drift(y)  # noqa: E731
        fp = 0.5 * div(lambda y, f=flux: f(y, lambda z: z), x) + 0.5 * lap(dens, x)
        ode = -div(lambda y, f=flux, a=a: f(y, lambda z: -0.5 * (z + mix.score(z, a))), x)
        wrong = -div(lambda y, f=flux, a=a: f(y, lambda z: -0.5 * z - mix.score(z, a)), x)
        scale = dp.abs().max()
        assert (fp - dp).abs().max() < 1e-4 * scale and (ode - dp).abs().max() < 1e-6 * scale
        assert (wrong - dp).abs().max() > 0.5 * scale


def test_identity_check_S10_the_normaliser_drops_out_of_the_score():
    mix = toys.mixture_2d()
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    log_z = 3.7  # any constant
    energy = lambda y: -mix.log_prob(y) - log_z  # noqa: E731  p = exp(-f) / Z with f = energy
    h = 1e-5
    fd = lambda f: torch.stack([(f(x + h * e) - f(x - h * e)) / (2 * h) for e in torch.eye(2, dtype=torch.float64)], 1)  # noqa: E731
    unnormalised = -fd(energy)
    normalised = fd(mix.log_prob)
    assert (unnormalised - normalised).abs().max() < 1e-8 and (normalised - mix.score(x)).abs().max() < 1e-7


def test_probability_flow_is_the_limit_of_ddim_and_samples_the_target():
    mix = toys.mixture_2d()
    ab = _ab64()
    x_T = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = schedules.inference_timesteps(1000, 50)
    levels = torch.cat([ab[steps], torch.tensor([1.0], dtype=torch.float64)])
    exact_eps = lambda x, a: mix.eps_star(x, a)  # noqa: E731
    flow = score.probability_flow(exact_eps, x_T, levels, substeps=20)
    gaps = []
    for n in (10, 50, 250):
        out = ddim.sample(lambda x, t: mix.eps_star(x, ab[t]), x_T, ab, n, progress=False)
        ts = schedules.inference_timesteps(1000, n)
        lv = torch.cat([ab[ts], torch.tensor([1.0], dtype=torch.float64)])
        gaps.append((out - score.probability_flow(exact_eps, x_T, lv, substeps=20)).abs().mean().item())
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.02
    target, _ = mix.sample(1000, torch.Generator().manual_seed(1))
    other, _ = mix.sample(1000, torch.Generator().manual_seed(2))
    spread = abs(metrics.energy_distance(other, target, max_points=2000))
    assert metrics.energy_distance(flow, target, max_points=2000) < 5 * spread + 0.01


def test_bad_input():
    x = torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="alpha_bar"):
        score.x0_from_score(x, x, 1.5)
    with pytest.raises(ValueError, match="undefined"):
        score.score_from_eps(x, 1.0)
    with pytest.raises(ValueError, match="decreasing"):
        score.annealed_langevin(lambda y, s: y, x, [0.1, 1.0], 2, 0.1)
    with pytest.raises(ValueError, match="increasing"):
        score.probability_flow(lambda y, a: y, x, torch.tensor([0.5, 0.1]))
    with pytest.raises(ValueError, match="shape"):
        score.tweedie_denoiser(x, torch.zeros(3), 1.0)


def test_a_network_trained_by_denoising_score_matching_learns_the_score():
    mix = toys.mixture_2d()
    ab = _ab64()
    net, losses = score.train_score_mlp(mix, ab, steps=1500, progress=False)
    assert sum(losses[-100:]) / 100 < sum(losses[:100]) / 100
    err = score.score_error_over_t(net, mix, [50, 300, 700], n=2000)
    assert (err < 0.1).all(), err
    with pytest.raises(ValueError, match="expected x_t"):
        net(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
