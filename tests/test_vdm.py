"""Groundwork for chapter 04: the loss-weight identities and closed-form terms (rows D5, D14-D16, D18, D19, D21, D24)."""

import math

import pytest
import torch

from dlearn import datasets, distributions, elbo, schedules, toys, vdm


@pytest.fixture
def ab():
    return schedules.alpha_bar_from_betas(schedules.linear_betas(1000).double())


def test_check_D14_reverse_variance_is_fixed_by_the_schedule(ab):
    betas = schedules.linear_betas(1000).double()
    a_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    var = vdm.posterior_variance(ab, a_prev)
    assert (var <= betas + 1e-15).all()
    assert var[0] == 0  # t = 1: alpha_bar_0 = 1, so the first step needs its own decoder


def test_check_D15_equal_variance_kl(gen):
    mq, mp = torch.randn(5, 64, generator=gen, dtype=torch.float64), torch.randn(5, 64, generator=gen, dtype=torch.float64)
    var = 0.37
    general = distributions.kl_normal_diag(mq, torch.full_like(mq, math.log(var)), mp, torch.full_like(mp, math.log(var)))
    torch.testing.assert_close(vdm.kl_equal_variance(mq, mp, var), general, atol=1e-12, rtol=1e-12)


def test_check_D16_the_kl_is_a_weighted_x0_regression(ab, gen):
    from dlearn import ddpm

    x0, x0_hat, eps = (torch.randn(4, 64, generator=gen, dtype=torch.float64) for _ in range(3))
    for t in (1, 10, 500, 999):  # array index t is the book's step t + 1 >= 2
        a_t, a_p = ab[t], ab[t - 1]
        x_t = ddpm.q_sample(x0, a_t.expand(4), eps)
        mu_q, var = ddpm.posterior_mean_var(x0, x_t, a_t, a_p)
        mu_p, _ = ddpm.posterior_mean_var(x0_hat, x_t, a_t, a_p)
        kl = vdm.kl_equal_variance(mu_q, mu_p, var.reshape(()))
        torch.testing.assert_close(kl, vdm.x0_loss_weight(a_t, a_p) * ((x0_hat - x0) ** 2).sum(1), rtol=1e-10, atol=0)


def test_check_D18_snr_form_of_the_weight(ab):
    a_t, a_p = ab[1:], ab[:-1]
    rel = (vdm.x0_loss_weight(a_t, a_p) - vdm.snr_loss_weight(a_t, a_p)).abs() / vdm.snr_loss_weight(a_t, a_p)
    assert rel.max() < 1e-9


def test_check_D19_monotone_snr_gives_positive_weights():
    for name in ("linear", "cosine"):
        a = schedules.alpha_bar_from_betas(schedules.make_betas(name, 1000).double())
        s = schedules.snr(a)
        assert (s[1:] < s[:-1]).all() and (vdm.snr_loss_weight(a[1:], a[:-1]) > 0).all()
    # a non-monotone schedule has a negative weight: there the bound rewards a worse x0_hat
    a = torch.tensor([0.9, 0.5, 0.6, 0.1], dtype=torch.float64)
    w = vdm.snr_loss_weight(a[1:], a[:-1])
    assert (w < 0).any()


def test_check_D24_eps_weight_is_the_x0_weight_rescaled(ab):
    a_t, a_p = ab[1:], ab[:-1]
    ratio = vdm.eps_loss_weight(a_t, a_p) / vdm.x0_loss_weight(a_t, a_p)
    torch.testing.assert_close(ratio, (1 - a_t) / a_t, rtol=1e-12, atol=0)


def test_check_D5_prior_matching_is_small_but_not_zero():
    x0 = datasets.digits("train", form="unit")[0].reshape(1000, 64).double()
    kls = []
    for num_steps in (10, 100, 1000):  # the same beta range 1e-4 -> 0.02 over more and more steps
        betas = schedules.linear_betas(num_steps).double()
        kls.append(vdm.prior_matching_kl(x0, schedules.alpha_bar_from_betas(betas)[-1]).mean().item())
    assert 1e-4 < kls[-1] < 2e-3  # 9.2e-4 nats for the digits in [-1, 1] with the DDPM schedule: small, not 0
    assert kls[0] > kls[1] > kls[2]
    # the closed form against the general Gaussian KL
    a = schedules.alpha_bar_from_betas(schedules.linear_betas(1000).double())[-1]
    general = distributions.kl_normal_diag(a.sqrt() * x0, torch.full_like(x0, math.log(1 - a)))
    torch.testing.assert_close(vdm.prior_matching_kl(x0, a), general, rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def tb2_chain():
    model = vdm.GaussianDiffusion1D(torch.linspace(1e-4, 0.05, 200, dtype=torch.float64), m0=0.5, s0=0.3)
    return model, model.forward_trajectories(0.9, 20_000, torch.Generator().manual_seed(0))


def test_check_D6_consistency_form_is_valid_but_eq45_is_not(tb2_chain):
    model, traj = tb2_chain
    direct = model.trajectory_log_ratio(traj)
    consistency = model.consistency_terms(traj).sum(1)
    torch.testing.assert_close(consistency, direct, atol=1e-10, rtol=0)  # a regrouping of the same sum
    eq45 = model.eq45_terms(traj).sum(1)
    assert eq45.mean() < direct.mean() - 100  # about 1 nat per step too low: not an identity


def test_check_D7_per_step_variances(tb2_chain):
    model, traj = tb2_chain
    v_cons = model.consistency_terms(traj)[:, 1:-1].var(0)  # steps t = 1..T-1
    v_den = model.denoising_terms(traj)[:, 2:-1].var(0)  # steps t = 2..T-1
    assert ((v_cons[10:] > 0.7) & (v_cons[10:] < 1.4)).all()  # about 1 nat^2 at every step
    assert v_den[18] < 1e-2 and v_den[48] < 1e-4 and v_den[98] < 1e-6  # t = 20, 50, 100: vanishing
    # the random-t single-sample estimator: T * term_t with t uniform
    t = torch.randint(0, v_den.numel(), (20_000,), generator=torch.Generator().manual_seed(1))
    rows = torch.arange(20_000)
    cons = model.consistency_terms(traj)[:, 2:-1][rows, t] * v_den.numel()
    den = model.denoising_terms(traj)[:, 2:-1][rows, t] * v_den.numel()
    assert cons.var() > 5 * den.var()


def test_check_D10_denoising_form_equals_the_trajectory_bound_and_bounds_log_p(tb2_chain):
    model, traj = tb2_chain
    direct = model.trajectory_log_ratio(traj)
    denoising = model.denoising_terms(traj).sum(1)
    diff = denoising - direct  # paired: same trajectories
    assert diff.mean().abs() < 3 * diff.std() / math.sqrt(len(diff))
    assert direct.mean() < model.exact_log_marginal(0.9)  # a lower bound on the model's exact log-likelihood


def _log_normal(x, mean, var):
    var = torch.as_tensor(var, dtype=torch.float64)
    return -0.5 * (torch.log(2 * math.pi * var) + (x - mean) ** 2 / var)


@pytest.mark.parametrize("x0", [0.2, 0.9])
def test_the_gap_of_the_bound_is_the_kl_between_the_two_path_distributions(x0):
    """Jensen's gap, log p(x0) - bound = KL(q(x_1:T | x0) || p_theta(x_1:T | x0)), with both sides Gaussian in T dimensions."""
    model = vdm.GaussianDiffusion1D(torch.linspace(1e-3, 0.1, 50, dtype=torch.float64), m0=0.5, s0=0.3)
    T = model.num_steps
    lin, shift = torch.zeros(T + 1, T + 1, dtype=torch.float64), torch.zeros(T + 1, dtype=torch.float64)
    lin[T, T] = 1.0  # the model's chain as x = shift + lin @ n, n ~ N(0, I)
    for t in range(T, 0, -1):
        offset, var = model.model_step(t, torch.zeros((), dtype=torch.float64))
        slope = model.model_step(t, torch.ones((), dtype=torch.float64))[0] - offset
        lin[t - 1], shift[t - 1] = slope * lin[t], slope * shift[t] + offset
        lin[t - 1, t - 1] = var.sqrt()
    cov = lin @ lin.T
    marginal = -0.5 * (math.log(2 * math.pi) + torch.log(cov[0, 0]) + (x0 - shift[0]) ** 2 / cov[0, 0])
    torch.testing.assert_close(marginal, model.exact_log_marginal(x0), atol=1e-12, rtol=0)
    mean_p, cov_p = toys.gaussian_condition(shift, cov, [0], torch.tensor([[x0]], dtype=torch.float64))
    a = model.alpha_bar[1:]
    s, t = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    lo, hi = torch.minimum(s, t), torch.maximum(s, t)
    cov_q = (a[hi] / a[lo]).sqrt() * (1 - a[lo])  # Cov(x_s, x_t | x0) of the forward chain
    mvn = torch.distributions.MultivariateNormal
    kl = torch.distributions.kl_divergence(mvn(a.sqrt() * x0, cov_q), mvn(mean_p[0], cov_p))
    gap = model.exact_log_marginal(x0) - model.expected_bound(x0)
    assert gap > 0.01
    torch.testing.assert_close(kl, gap, atol=1e-9, rtol=0)


def test_the_second_derivation_regroups_the_log_ratio_on_every_trajectory(tb2_chain):
    """Markov, Bayes and telescoping (Luo eqs. 46-58): reconstruction + log p(x_T) / q(x_T | x0) + the posterior
    log-ratios equal log p(x_0:T) / q(x_1:T | x0) on each trajectory, not just in expectation."""
    model, traj = tb2_chain
    x0, T = traj[0, 0].item(), model.num_steps
    log_q = lambda t, x: _log_normal(x, model.alpha_bar[t].sqrt() * x0, 1 - model.alpha_bar[t])
    regrouped = _log_normal(traj[:, 0], *model.model_step(1, traj[:, 1]))  # reconstruction
    regrouped = regrouped + _log_normal(traj[:, -1], 0.0, 1.0) - log_q(T, traj[:, -1])  # prior ratio
    for t in range(2, T + 1):
        posterior = _log_normal(traj[:, t - 1], model.q_posterior_mean(t, traj[:, t], x0), model.q_posterior_var(t))
        regrouped = regrouped + _log_normal(traj[:, t - 1], *model.model_step(t, traj[:, t])) - posterior
    torch.testing.assert_close(regrouped, model.trajectory_log_ratio(traj), atol=1e-6, rtol=0)


def test_exact_log_marginal_by_sampling_the_model():
    model = vdm.GaussianDiffusion1D(torch.linspace(1e-3, 0.2, 30, dtype=torch.float64))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200_000, generator=g, dtype=torch.float64)
    for t in range(model.num_steps, 0, -1):
        mean, var = model.model_step(t, x)
        x = mean + var.sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
    grid = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    mean, var = x.mean(), x.var()
    expected = -0.5 * (torch.log(2 * math.pi * var) + (grid - mean) ** 2 / var)
    got = torch.stack([model.exact_log_marginal(v) for v in grid])
    torch.testing.assert_close(got, expected, atol=0.02, rtol=0)


def test_expected_bound_is_the_mean_of_the_sampled_bound(tb2_chain):
    model, traj = tb2_chain
    direct = model.trajectory_log_ratio(traj)
    assert (direct.mean() - model.expected_bound(0.9)).abs() < 3 * direct.std() / math.sqrt(len(direct))


def test_expected_bound_terms_are_the_means_of_the_sampled_terms(tb2_chain):
    """Each closed-form term against the Monte Carlo mean of `denoising_terms`' column (reconstruction, t = 2..T)."""
    model, traj = tb2_chain
    sampled = model.denoising_terms(traj)  # column 0 reconstruction, 2..T denoising, the prior folded into T
    exact = model.expected_bound_terms(0.9)
    assert exact["denoising"].shape == (model.num_steps - 1,) and (exact["denoising"] < 0).all()
    want = torch.cat([exact["reconstruction"].reshape(1), exact["denoising"]])
    want[-1] = want[-1] + exact["prior"]
    got = torch.cat([sampled[:, :1], sampled[:, 2:]], 1)
    z = (got.mean(0) - want) / (got.std(0) / math.sqrt(len(got)))
    assert z.abs().max() < 4.5  # 200 columns: a 4.5-SE miss anywhere has probability about 1e-3


def test_check_D20_the_learned_schedule_is_monotone():
    for seed in range(100):
        torch.manual_seed(seed)
        net = schedules.MonotoneLogSNR(hidden=64).double()
        t = torch.linspace(0, 1, 10_000, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(net(t).sum(), t)
        assert (grad < 0).all(), seed  # the log-SNR falls: the SNR decreases in t
    with torch.no_grad():
        logsnr = net(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(logsnr, torch.tensor([10.0, -8.0], dtype=torch.float64))  # the endpoints
    lam = torch.linspace(-12, 12, 101, dtype=torch.float64)  # alpha^2 / sigma^2 = SNR:
    torch.testing.assert_close(torch.sigmoid(lam) / torch.sigmoid(-lam), torch.exp(lam), rtol=1e-12, atol=0)


def test_the_schedules_return_the_log_snr():
    """MonotoneLogSNR falls strictly from logsnr_max at t = 0 to logsnr_min at t = 1; LinearLogSNR's
    alpha^2 = sigmoid(logsnr), discretised into betas, gives back its log-SNR through `schedules.logsnr`."""
    t = torch.linspace(0, 1, 10_001, dtype=torch.float64)
    for seed in range(5):
        torch.manual_seed(seed)
        net = schedules.MonotoneLogSNR(logsnr_max=7.5, logsnr_min=-4.0, hidden=32).double()
        with torch.no_grad():
            lam = net(t)
        assert (lam[1:] < lam[:-1]).all(), seed
        torch.testing.assert_close(lam[[0, -1]], torch.tensor([7.5, -4.0], dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(net.alpha_bar(t).detach(), torch.sigmoid(lam), rtol=0, atol=0)
    linear = schedules.LinearLogSNR(logsnr_max=6.0, logsnr_min=-7.0)
    assert linear(torch.tensor(0.0)) == 6.0 and linear(torch.tensor(1.0)) == -7.0
    alpha_bar = schedules.alpha_bar_from_betas(schedules.betas_from_logsnr(linear, 200))
    s = torch.linspace(0, 1, 200, dtype=torch.float64)
    torch.testing.assert_close(schedules.logsnr(alpha_bar), linear(s), rtol=0, atol=1e-9)


def _tb2_continuous_limit(logsnr_min: float, x0: float = 0.9, m0: float = 0.5, s0: float = 0.3) -> float:
    """The T -> infinity bound of TB2 with the exact-posterior decoder: log p_data(x0) plus the prior's mismatch
    E_{q(z_1 | x0)}[log N(z_1; 0, 1) - log q(z_1)], which depends on SNR_min alone."""
    a = torch.sigmoid(torch.tensor(logsnr_min, dtype=torch.float64))
    log_p_data = -0.5 * math.log(2 * math.pi * s0**2) - (x0 - m0) ** 2 / (2 * s0**2)
    mean_z, var_z = a.sqrt() * x0, 1 - a  # q(z_1 | x0)
    mean_q, var_q = a.sqrt() * m0, a * s0**2 + 1 - a  # q(z_1), the data diffused
    e_log_prior = -0.5 * math.log(2 * math.pi) - 0.5 * (mean_z**2 + var_z)
    e_log_q = -0.5 * torch.log(2 * math.pi * var_q) - 0.5 * ((mean_z - mean_q) ** 2 + var_z) / var_q
    return (log_p_data + e_log_prior - e_log_q).item()


def test_check_D21_the_bound_depends_on_the_schedule_only_through_snr_min_when_the_decoder_is_exact():
    paths = {
        "linear": lambda s: 10 + (-8 - 10) * s,
        "cosine-shaped, same ends": lambda s: 10 + (-8 - 10) * (1 - torch.cos(math.pi * s / 2)),
        "another SNR_max": lambda s: 3 + (-8 - 3) * s,
        "another SNR_min": lambda s: 10 + (-3 - 10) * s,
    }
    def bound(f, num_steps):
        return vdm.GaussianDiffusion1D(schedules.betas_from_logsnr(f, num_steps)).expected_bound(0.9).item()

    bounds = {num_steps: [bound(f, num_steps) for f in paths.values()] for num_steps in (1000, 10_000, 100_000)}
    limits = [_tb2_continuous_limit(-8.0)] * 3 + [_tb2_continuous_limit(-3.0)]
    errors = {n: [abs(b - lim) for b, lim in zip(bs, limits, strict=True)] for n, bs in bounds.items()}
    assert max(errors[100_000]) < 1e-3  # every path converges to its closed-form limit ...
    assert all(e1 > 5 * e2 for e1, e2 in zip(errors[10_000], errors[100_000], strict=True))  # ... about as 1/T
    assert limits[3] < limits[0] - 0.01  # another SNR_min converges elsewhere


def test_check_D2_variance_preserving_steps(gen):
    ab = schedules.alpha_bar_from_betas(schedules.linear_betas(1000).double())
    alpha = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    x = torch.randn(100_000, generator=gen, dtype=torch.float64)  # unit-variance data
    y = x.clone()
    for t in range(300):
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        x = alpha[t].sqrt() * x + (1 - alpha[t]).sqrt() * noise  # variance preserving
        y = alpha[t].sqrt() * y + noise  # mean sqrt(alpha) x, variance 1: not preserving
        if t % 50 == 0:
            assert abs(x.var().item() - 1) < 4 * math.sqrt(2 / 100_000)  # 4 standard errors of a sample variance
    assert y.var() > 50


def test_check_D8_bayes_rewrite_of_the_encoder_step(gen):
    """q(x_t | x_{t-1}, x0) = q(x_{t-1} | x_t, x0) q(x_t | x0) / q(x_{t-1} | x0), in log space (TB2, 1-D)."""
    from dlearn import ddpm

    ab = schedules.alpha_bar_from_betas(schedules.linear_betas(1000).double())
    normal = lambda x, m, v: -0.5 * (torch.log(2 * math.pi * v) + (x - m) ** 2 / v)  # noqa: E731
    x0 = torch.tensor([[0.4]], dtype=torch.float64)
    for t in (1, 10, 500, 999):
        a_t, a_p = ab[t], ab[t - 1]
        x_p, x_t = torch.randn(2, 1, 1, generator=gen, dtype=torch.float64)
        lhs = normal(x_t, (a_t / a_p).sqrt() * x_p, 1 - a_t / a_p)
        mean, var = ddpm.posterior_mean_var(x0, x_t, a_t, a_p)
        rhs = normal(x_p, mean, var) + normal(x_t, a_t.sqrt() * x0, 1 - a_t) - normal(x_p, a_p.sqrt() * x0, 1 - a_p)
        torch.testing.assert_close(lhs, rhs, atol=1e-10, rtol=1e-10)


def test_check_D9_the_true_reverse_step_is_gaussian_only_for_small_steps():
    mix = toys.mixture_2d()
    ab1000 = schedules.alpha_bar_from_betas(schedules.linear_betas(1000).double())
    x_t = torch.tensor([[0.3, 0.0]], dtype=torch.float64)
    g = torch.linspace(-4, 4, 401, dtype=torch.float64)
    pts = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    area = (g[1] - g[0]) ** 2
    kls = {}
    for num_steps in (10, 1000):
        sub = ab1000[torch.arange(1, num_steps + 1) * (1000 // num_steps) - 1]  # the schedule sub-sampled to T steps
        i = int(0.3 * num_steps)
        w, m, c = vdm.true_reverse_step(mix, sub[i].item(), sub[i - 1].item(), x_t)
        comps = torch.stack([torch.distributions.MultivariateNormal(m[k], c[k]).log_prob(pts) for k in range(3)])
        log_p = torch.logsumexp(comps + w.log()[:, None], 0)
        mean = (w[:, None] * m).sum(0)
        cov = (w[:, None, None] * (c + m[:, :, None] * m[:, None, :])).sum(0) - mean[:, None] * mean[None, :]
        log_q = torch.distributions.MultivariateNormal(mean, cov).log_prob(pts)
        kls[num_steps] = ((log_p.exp() * (log_p - log_q)).sum() * area).item()
    assert kls[10] > 0.01 and kls[1000] < 1e-4 and kls[10] > 1000 * kls[1000]


def test_check_D12_and_D22_one_shot_marginal_and_its_inversion(gen):
    from dlearn import ddpm

    ab = schedules.alpha_bar_from_betas(schedules.linear_betas(1000).double())
    alpha = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    x0 = 0.7
    x = torch.full((100_000,), x0, dtype=torch.float64)
    for t in range(1000):
        x = alpha[t].sqrt() * x + (1 - alpha[t]).sqrt() * torch.randn(x.shape, generator=gen, dtype=torch.float64)
        if t + 1 in (1, 10, 100, 500, 1000):
            a = ab[t]
            assert abs(x.mean() - a.sqrt() * x0) < 0.01 and abs(x.var() / (1 - a) - 1) < 0.01
    x0s, eps = torch.randn(2, 8, generator=gen, dtype=torch.float64)
    x_t = ddpm.q_sample(x0s, ab[500], eps)
    torch.testing.assert_close((x_t - (1 - ab[500]).sqrt() * eps) / ab[500].sqrt(), x0s, atol=1e-12, rtol=0)


def test_check_D13_posterior_by_regression(gen):
    """With x0 fixed, regress x_{t-1} on x_t over forward samples: slope and residual variance match Luo eq. 84."""
    ab = schedules.alpha_bar_from_betas(schedules.linear_betas(1000).double())
    t = 300
    a_t, a_p = ab[t], ab[t - 1]
    x0 = 0.5
    x_p = a_p.sqrt() * x0 + (1 - a_p).sqrt() * torch.randn(200_000, generator=gen, dtype=torch.float64)
    x_t = (a_t / a_p).sqrt() * x_p + (1 - a_t / a_p).sqrt() * torch.randn(200_000, generator=gen, dtype=torch.float64)
    slope = ((x_t - x_t.mean()) * (x_p - x_p.mean())).mean() / x_t.var()
    resid = (x_p - x_p.mean() - slope * (x_t - x_t.mean())).var()
    assert abs(slope / ((a_t / a_p).sqrt() * (1 - a_p) / (1 - a_t)) - 1) < 0.01
    assert abs(resid / vdm.posterior_variance(a_t, a_p) - 1) < 0.01


def test_check_D17_uniform_t_is_unbiased_for_the_sum(gen):
    model = vdm.GaussianDiffusion1D(torch.linspace(1e-4, 0.05, 200, dtype=torch.float64))
    exact = model.expected_bound_terms(0.9)
    exact_sum = exact["denoising"].sum() + exact["prior"]  # no sampling: independent of the draws below
    traj = model.forward_trajectories(0.9, 100_000, gen)
    terms = model.denoising_terms(traj)[:, 2:]  # the T - 1 matching terms (prior folded into the last)
    t = torch.randint(0, terms.shape[1], (100_000,), generator=gen)
    draws = terms[torch.arange(100_000), t] * terms.shape[1]
    assert (draws.mean() - exact_sum).abs() < 3 * draws.std() / math.sqrt(len(draws))


def test_check_D23_and_D25_eps_forms(gen):
    from dlearn import ddpm

    ab = schedules.alpha_bar_from_betas(schedules.linear_betas(1000).double())
    x0, eps, eps_hat = torch.randn(3, 4, 16, generator=gen, dtype=torch.float64)
    for t in (1, 100, 900):
        a_t, a_p = ab[t], ab[t - 1]
        one_minus_beta = a_t / a_p
        x_t = ddpm.q_sample(x0, a_t, eps)
        mu_eps = x_t / one_minus_beta.sqrt() - (1 - one_minus_beta) / ((1 - a_t).sqrt() * one_minus_beta.sqrt()) * eps
        torch.testing.assert_close(mu_eps, ddpm.posterior_mean_var(x0, x_t, a_t, a_p)[0], atol=1e-12, rtol=0)  # D23
        x0_hat = (x_t - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()
        lhs = ((x0_hat - x0) ** 2).sum(1)
        torch.testing.assert_close(lhs, (1 - a_t) / a_t * ((eps_hat - eps) ** 2).sum(1), rtol=1e-10, atol=1e-12)  # D25


class _ZeroNet(torch.nn.Module):
    """Logits of zero: x0_hat is the likelihood-only posterior mean over the levels."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, z, logsnr):
        return self.w * torch.zeros(z.shape[0], 17, 8, 8)


def test_decoder_probabilities_are_normalised_and_sharpen():
    x, _ = datasets.digits("test")
    x = x[:4]
    v = vdm.level_values()
    for logsnr_value, expected_max in ((13.3, 0.999), (0.0, None)):
        logsnr = torch.full((4,), logsnr_value)
        z = torch.sigmoid(logsnr).sqrt().reshape(-1, 1, 1, 1) * v[x]  # noise-free z at the level's value
        probs = torch.softmax(vdm.level_log_likelihoods(z.float(), logsnr), dim=1)
        torch.testing.assert_close(probs.sum(1), torch.ones_like(probs.sum(1)))
        if expected_max:
            picked = probs.gather(1, x.unsqueeze(1)).min()
            assert picked > expected_max  # at SNR_max the decoder is (nearly) certain of the level


def test_the_diffusion_term_is_an_unbiased_estimate_of_its_integral():
    """With x0_hat = 0 the diffusion term is 1/2 |x|^2 (SNR(0) - SNR(1)) exactly; the random-t estimate averages to it."""
    model = vdm.VDM(_ZeroNet(), schedules.LinearLogSNR(5.0, -5.0))
    model.x0_hat = lambda z, logsnr, aug=None: torch.zeros_like(z)
    x, _ = datasets.digits("test")
    x = x[:1].expand(20_000, 1, 8, 8)
    terms = model.neg_elbo_terms(x, torch.Generator().manual_seed(0)).latent.detach().double()
    sq = (distributions.levels_to_unit(x[:1]) ** 2).sum().item()
    exact = 0.5 * sq * (math.exp(5.0) - math.exp(-5.0))
    se = terms.std() / math.sqrt(len(terms))  # conservative: the antithetic t-grid makes the real error smaller
    assert abs(terms.mean().item() - exact) < 3 * se
    # a perfect denoiser has no diffusion loss
    model.x0_hat = lambda z, logsnr, aug=None: distributions.levels_to_unit(x[:4])
    assert model.neg_elbo_terms(x[:4]).latent.abs().max() < 1e-6


def test_vdm_terms_shapes_and_bound_is_finite():
    from dlearn import nets

    net = nets.ConvDenoiser(in_ch=1, out_ch=17, channels=(8, 16), emb_dim=16, emb_scale=10.0)
    model = vdm.VDM(net, schedules.MonotoneLogSNR(hidden=16))
    x, _ = datasets.digits("val")
    t = model.neg_elbo_terms(x[:6], torch.Generator().manual_seed(0))
    assert isinstance(t, elbo.BoundTerms)
    assert all(v.shape == (6,) and torch.isfinite(v).all() for v in (t.reconstruction, t.prior, t.latent, t.neg_elbo))
    torch.testing.assert_close(t.neg_elbo, t.reconstruction + t.prior + t.latent)
    t.neg_elbo.mean().backward()  # gradients reach the schedule too
    assert model.schedule.w2.grad is not None and net.conv_in.weight.grad is not None


def test_an_augmented_vdm_models_the_plain_digits_when_given_no_labels(gen):
    """Non-leaky augmentation: labels all zero = no labels = the untransformed digits; labels do matter."""
    from dlearn import datasets

    torch.manual_seed(0)
    model = vdm.build_vdm(augment=True)
    x, _ = datasets.digits("val")
    z, logsnr = torch.randn(x.shape, generator=gen), torch.full((len(x),), 2.0)
    with torch.no_grad():
        plain = model.x0_hat(z, logsnr)
        assert torch.equal(plain, model.x0_hat(z, logsnr, torch.zeros(len(x), 4)))
        _, labels = datasets.augment_digits(x, 1.0, gen)
        assert (model.x0_hat(z, logsnr, labels) - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="cond given, but this denoiser was built without cond_dim"):
        vdm.build_vdm(augment=False).x0_hat(z, logsnr, labels)
