"""Chapter 01's checks E1-E7 on TB1, where log p(x) and the posterior are exact."""

import math

import pytest
import torch

from dlearn import elbo, toys

MVN = torch.distributions.MultivariateNormal


@pytest.fixture
def tb1():
    return toys.linear_gaussian(d=5, k=2, sigma2=0.3, seed=1)


def _random_q(gen, n, k, scale=1.0):
    mean = torch.randn(n, k, generator=gen, dtype=torch.float64) * scale
    a = torch.randn(n, k, k, generator=gen, dtype=torch.float64) * 0.5
    return mean, a @ a.transpose(1, 2) + 0.1 * torch.eye(k, dtype=torch.float64)


def test_check_E1_ancestral_samples_have_the_marginal_covariance(tb1, gen):
    x, _ = tb1.sample(100_000, gen)
    err = torch.linalg.norm(torch.cov(x.T) - tb1.marginal_cov()) / torch.linalg.norm(tb1.marginal_cov())
    assert err < 0.02


def test_check_E2_three_ways_to_log_p_agree(tb1, gen):
    x, _ = tb1.sample(3, gen)
    exact = tb1.log_marginal(x)
    # grid quadrature over z in 2-D
    g = torch.linspace(-9, 9, 1201, dtype=torch.float64)
    zz = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 1, 2)
    quad = torch.logsumexp(tb1.log_joint(x[None], zz), 0) + 2 * math.log(g[1] - g[0])
    torch.testing.assert_close(quad, exact, atol=1e-8, rtol=0)
    # the chain rule at any z, with the exact posterior
    mean, cov = tb1.posterior(x)
    z = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(tb1.log_joint(x, z) - MVN(mean, cov).log_prob(z), exact, atol=1e-10, rtol=0)


def test_check_E2_naive_monte_carlo_degrades_with_dimension(gen):
    stats = {}
    for d in (5, 20):
        model = toys.linear_gaussian(d=d, k=2, sigma2=0.3, seed=1)
        x, _ = model.sample(1, gen)
        logs = torch.stack([elbo.naive_log_evidence(model, x, 1000, gen)[0] for _ in range(2000)])
        rel = (logs - model.log_marginal(x)[0]).exp()  # p_hat / p
        stats[d] = (rel.std().item(), (logs - model.log_marginal(x)[0]).mean().item(), logs.std().item() / math.sqrt(2000))
    assert stats[20][0] > stats[5][0]  # relative SD grows as the posterior concentrates
    assert stats[20][1] < -3 * stats[20][2]  # the log of an unbiased estimate is biased low (Jensen)


def test_check_E3_elbo_below_log_p_and_mc_agrees(tb1, gen):
    x, _ = tb1.sample(20, gen)
    mean, cov = _random_q(gen, 20, 2)
    closed = elbo.elbo_closed_form(tb1, x, mean, cov)
    assert (closed < tb1.log_marginal(x)).all()
    est, se = elbo.elbo_monte_carlo(tb1.log_joint, MVN(mean, cov), x, 10_000, gen)
    assert ((est - closed).abs() < 3 * se).sum() >= 18  # 3 SE: ~99.7% each; allow a rare miss of 20


def test_check_E4_log_p_is_elbo_plus_kl(tb1, gen):
    x, _ = tb1.sample(20, gen)
    mean, cov = _random_q(gen, 20, 2, scale=3.0)
    gap = tb1.log_marginal(x) - elbo.elbo_closed_form(tb1, x, mean, cov)
    torch.testing.assert_close(gap, elbo.kl_to_posterior(tb1, x, mean, cov), atol=1e-10, rtol=0)
    assert gap.max() > 10  # far from the posterior: large gaps, still exact
    pm, pc = tb1.posterior(x)
    torch.testing.assert_close(elbo.elbo_closed_form(tb1, x, pm, pc), tb1.log_marginal(x), atol=1e-12, rtol=0)


def test_check_E5_maximising_the_elbo_minimises_the_kl(tb1, gen):
    x, _ = tb1.sample(1, gen)
    mean, cov, hist = elbo.fit_gaussian_q(tb1, x[0], steps=3000)
    pm, pc = tb1.posterior(x)
    assert (mean - pm[0]).norm() < 1e-6 and (cov - pc).norm() < 1e-6
    d_elbo, d_kl = hist[1:, 0] - hist[:-1, 0], hist[1:, 1] - hist[:-1, 1]
    assert (d_elbo + d_kl).abs().max() < 1e-10  # log p(x) does not depend on q


def test_check_E6_mc_error_falls_as_one_over_sqrt_n(tb1, gen):
    x, _ = tb1.sample(1, gen)
    mean, cov = _random_q(gen, 1, 2)
    q = MVN(mean, cov)
    closed = elbo.elbo_closed_form(tb1, x, mean, cov)[0]
    ns = [10, 100, 1000, 10_000]
    rmse = [
        torch.stack([elbo.elbo_monte_carlo(tb1.log_joint, q, x, n, gen)[0][0] - closed for _ in range(300)]).pow(2).mean().sqrt()
        for n in ns
    ]
    slope = torch.linalg.lstsq(
        torch.stack([torch.log(torch.tensor(ns, dtype=torch.float64)), torch.ones(4, dtype=torch.float64)], 1),
        torch.log(torch.stack(rmse))[:, None],
    ).solution[0, 0]
    assert abs(slope + 0.5) < 0.05


def test_check_E7_iwae_tightens_monotonically(tb1, gen):
    x, _ = tb1.sample(1, gen)
    pm, pc = tb1.posterior(x)
    q = MVN(pm + 0.7, 2.0 * pc)  # a deliberately poor q
    draws = [torch.stack([elbo.iwae_bound(tb1.log_joint, q, x, k, gen)[0] for _ in range(200)]) for k in (1, 10, 100, 1000)]
    means = [d.mean() for d in draws]
    assert all(a < b for a, b in zip(means, means[1:], strict=False))
    exact = tb1.log_marginal(x)[0]
    assert means[-1] < exact + 0.01 and exact - means[-1] < 0.05
    # K = 1 is the ELBO: its mean is the closed form within 3 standard errors
    closed = elbo.elbo_closed_form(tb1, x, pm + 0.7, 2.0 * pc)[0]
    assert (means[0] - closed).abs() < 3 * draws[0].std() / math.sqrt(200)


def test_log_mean_exp_and_bad_input(tb1):
    torch.testing.assert_close(elbo.log_mean_exp(torch.log(torch.tensor([1.0, 3.0]))), torch.log(torch.tensor(2.0)))
    with pytest.raises(ValueError, match="q_mean"):
        elbo.elbo_closed_form(tb1, torch.zeros(3, 5), torch.zeros(3, 3), torch.eye(2))
    with pytest.raises(ValueError, match="one point"):
        elbo.fit_gaussian_q(tb1, torch.zeros(2, 5))
    with pytest.raises(TypeError, match="Gaussian"):
        elbo.rsample(torch.distributions.Uniform(0.0, 1.0), 3)


def test_bound_terms_reject_a_term_of_the_wrong_shape():
    b = torch.ones(4)
    t = elbo.BoundTerms(reconstruction=b, prior=b, latent=torch.zeros(4), neg_elbo=2 * b)
    assert t.parts == {}
    with pytest.raises(ValueError, match=r"BoundTerms.prior must be a tensor of the bound's shape \(4,\), got \(4, 1\)"):
        elbo.BoundTerms(reconstruction=b, prior=b[:, None], latent=torch.zeros(4), neg_elbo=2 * b)
    with pytest.raises(ValueError, match=r"BoundTerms.latent must be a tensor of the bound's shape \(4,\), got float"):
        elbo.BoundTerms(reconstruction=b, prior=b, latent=0.0, neg_elbo=2 * b)


@pytest.mark.filterwarnings("ignore:std\\(\\)")  # the standard error of one draw is undefined (NaN)
def test_check_E7_iwae_with_one_sample_is_the_elbo_on_the_same_draws(tb1, gen):
    x, _ = tb1.sample(4, gen)
    pm, pc = tb1.posterior(x)
    q = MVN(pm + 0.7, 2.0 * pc)
    for seed in range(3):
        iwae = elbo.iwae_bound(tb1.log_joint, q, x, 1, torch.Generator().manual_seed(seed))
        est, _ = elbo.elbo_monte_carlo(tb1.log_joint, q, x, 1, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(iwae, est, atol=1e-12, rtol=0)


def test_check_E7_iwae_is_the_log_mean_of_the_importance_weights(tb1, gen):
    """On the same K draws: log((1/K) sum_k w_k), w_k = p(x, z_k) / q(z_k) computed here with torch.distributions
    (w is of order e^-10 here, so float64 holds it without log-sum-exp); it lies between the mean and the max of
    log w (Jensen, and (1/K) sum w <= max w), and equals log p(x) exactly when q is the posterior (every w_k = p(x))."""
    x, _ = tb1.sample(4, gen)
    pm, pc = tb1.posterior(x)
    q = MVN(pm + 0.7, 2.0 * pc)
    for k in (2, 10, 300):
        iwae = elbo.iwae_bound(tb1.log_joint, q, x, k, torch.Generator().manual_seed(k))
        z = elbo.rsample(q, k, torch.Generator().manual_seed(k))  # the same draws
        log_w = tb1.log_joint(x, z) - MVN(pm + 0.7, 2.0 * pc).log_prob(z)  # (K, B)
        assert log_w.shape == (k, 4) and log_w.max() < -1
        torch.testing.assert_close(iwae, torch.log(torch.exp(log_w).mean(0)), atol=1e-10, rtol=0)
        assert (log_w.mean(0) <= iwae + 1e-12).all() and (iwae <= log_w.max(0).values + 1e-12).all()
        assert (iwae > log_w.mean(0) + 1e-3).all() and (iwae < log_w.max(0).values - 1e-3).all()  # strictly, K > 1
    exact = tb1.log_marginal(x)
    for k in (1, 2, 10, 1000):
        torch.testing.assert_close(elbo.iwae_bound(tb1.log_joint, MVN(pm, pc), x, k, gen), exact, atol=1e-9, rtol=0)


def test_check_E7_iwae_stays_below_log_p_and_rises_to_it(tb1, gen):
    """Monte Carlo over R = 2000 independent draws of the bound per K (one data point repeated R times): its mean
    (standard error SE) is below log p(x) by more than -3 SE for every K, rises with K (each step by more than
    -3 SE of the difference), and its gap to log p(x) shrinks about as 1/K (Burda et al. 2016, Theorem 1;
    the gap ~ Var(w / p(x)) / 2K for large K, Rainforth et al. 2018)."""
    x, _ = tb1.sample(1, gen)
    pm, pc = tb1.posterior(x)
    r = 2000
    q = MVN((pm[0] + 0.5).expand(r, -1), 1.5 * pc)
    xr = x.expand(r, -1)
    exact = tb1.log_marginal(x)[0]
    ks = (1, 4, 16, 64, 256)
    means, ses = [], []
    for k in ks:
        draws = elbo.iwae_bound(tb1.log_joint, q, xr, k, gen)
        means.append(draws.mean())
        ses.append(draws.std() / math.sqrt(r))
    gaps = [exact - m for m in means]
    for k, gap, se in zip(ks, gaps, ses, strict=True):
        assert gap > -3 * se, (k, gap, se)  # a lower bound, within MC error
    for a, b, sa, sb in zip(means, means[1:], ses, ses[1:], strict=False):
        assert b - a > -3 * math.sqrt(sa**2 + sb**2)  # non-decreasing in K
    assert gaps[0] > 10 * ses[0] and gaps[-1] < gaps[0] / 20  # tightens, by far
    # large K: K x gap -> Var(w / p) / 2, with E_q[(w / p)^2] = E_q[(post / q)^2] from a wide Monte Carlo; at K = 64
    # the ratio is about 0.95 with a 10% standard error (seeds 0-5 of this set-up gave 0.88-1.04)
    z = elbo.rsample(q, 200, gen).reshape(-1, 2)
    rel = tb1.log_joint(x, z) - exact - MVN(pm[0] + 0.5, 1.5 * pc).log_prob(z)
    var_ratio = (2 * rel).exp().mean() - 1
    assert 0.6 < (ks[-2] * gaps[-2]) / (var_ratio / 2) < 1.4
