"""The toy worlds with exact densities: TB1 (one and two levels), TB2 and TB3 against independent oracles."""

import math

import pytest
import torch

from dlearn import toys

MVN = torch.distributions.MultivariateNormal


# --- TB1 --------------------------------------------------------------------------------------


def test_linear_gaussian_marginal_by_chain_rule_and_conditioning(gen):
    model = toys.linear_gaussian()
    x, _ = model.sample(20, gen)
    mean, cov = model.posterior(x)
    z = torch.randn(20, model.latent_dim, generator=gen, dtype=torch.float64)  # any z works
    chain = model.log_joint(x, z) - MVN(mean, cov).log_prob(z)
    torch.testing.assert_close(chain, model.log_marginal(x), rtol=0, atol=1e-10)
    # the posterior by generic conditioning of the joint Gaussian (z, x)
    k, d = model.latent_dim, model.data_dim
    joint_cov = torch.cat(
        [torch.cat([torch.eye(k, dtype=torch.float64), model.weight.T], 1), torch.cat([model.weight, model.marginal_cov()], 1)]
    )
    joint_mean = torch.cat([torch.zeros(k, dtype=torch.float64), model.bias])
    m2, c2 = toys.gaussian_condition(joint_mean, joint_cov, list(range(k, k + d)), x)
    torch.testing.assert_close(m2, mean)
    torch.testing.assert_close(c2, cov)


def test_linear_gaussian_samples_have_the_marginal_covariance(gen):
    model = toys.linear_gaussian()
    x, z = model.sample(100_000, gen)
    emp = torch.cov(x.T)
    assert torch.linalg.norm(emp - model.marginal_cov()) / torch.linalg.norm(model.marginal_cov()) < 0.02
    assert z.shape == (100_000, 2)


def test_two_level_marginal_and_posterior(gen):
    model = toys.two_level_linear_gaussian()
    k2, k1, d = model.dims
    a, b = model.a, model.b_weight
    expected = b @ (a @ a.T + model.s1 * torch.eye(k1, dtype=torch.float64)) @ b.T + model.s0 * torch.eye(d, dtype=torch.float64)
    torch.testing.assert_close(model.marginal_cov(), expected)
    x, z1, z2 = model.sample(50_000, gen)
    assert torch.linalg.norm(torch.cov(x.T) - expected) / torch.linalg.norm(expected) < 0.02
    x = x[:10]
    mean, cov = model.posterior(x)
    z = torch.randn(10, k2 + k1, generator=gen, dtype=torch.float64)
    chain = model.log_joint(x, z[:, k2:], z[:, :k2]) - MVN(mean, cov).log_prob(z)
    torch.testing.assert_close(chain, model.log_marginal(x), rtol=0, atol=1e-10)


def test_tb1_rejects_bad_parameters():
    with pytest.raises(ValueError, match="sigma2"):
        toys.LinearGaussianLatent(torch.ones(3, 2), torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match="bias"):
        toys.LinearGaussianLatent(torch.ones(3, 2), torch.zeros(4), 1.0)
    with pytest.raises(ValueError, match="columns"):
        toys.gaussian_condition(torch.zeros(3), torch.eye(3), [1, 2], torch.zeros(4, 1))


# --- TB2 / TB3 -------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha_bar", [1.0, 0.7, 0.05])
def test_mixture_log_prob_is_the_weighted_sum_of_diffused_components(alpha_bar, gen):
    mix = toys.mixture_2d()
    x = torch.randn(30, 2, generator=gen, dtype=torch.float64) * 2
    eye = torch.eye(2, dtype=torch.float64)
    comps = [
        math.log(w) + MVN(math.sqrt(alpha_bar) * m, alpha_bar * c + (1 - alpha_bar) * eye).log_prob(x)
        for m, c, w in zip(mix.means, mix.covs, mix.weights.tolist(), strict=True)
    ]
    torch.testing.assert_close(mix.log_prob(x, alpha_bar), torch.logsumexp(torch.stack(comps), 0))


def test_mixture_density_integrates_to_one():
    mix = toys.mixture_2d()
    g = torch.linspace(-7, 7, 561, dtype=torch.float64)
    gx, gy = torch.meshgrid(g, g, indexing="xy")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    for ab in (1.0, 0.3):
        mass = mix.log_prob(pts, ab).exp().sum() * (g[1] - g[0]) ** 2
        assert abs(mass.item() - 1) < 1e-4


@pytest.mark.parametrize("alpha_bar", [0.999, 0.5, 0.01])
def test_mixture_score_is_the_gradient_of_log_prob(alpha_bar, gen):
    mix = toys.mixture_2d()
    x = (torch.randn(25, 2, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    (grad,) = torch.autograd.grad(mix.log_prob(x, alpha_bar).sum(), x)
    torch.testing.assert_close(mix.score(x.detach(), alpha_bar), grad, rtol=1e-10, atol=1e-12)


def test_per_example_noise_levels(gen):
    mix = toys.mixture_2d()
    x = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    ab = torch.tensor([0.9, 0.5, 0.2, 0.01], dtype=torch.float64)
    rows = torch.cat([mix.score(x[i : i + 1], ab[i].item()) for i in range(4)])
    torch.testing.assert_close(mix.score(x, ab), rows)
    rows = torch.cat([mix.posterior_mean(x[i : i + 1], ab[i].item()) for i in range(4)])
    torch.testing.assert_close(mix.posterior_mean(x, ab), rows)


@pytest.mark.parametrize("alpha_bar", [0.9, 0.4, 0.05])
def test_posterior_mean_satisfies_tweedie(alpha_bar, gen):
    """E[x0 | x_t] by per-component Gaussian conditioning equals Tweedie's (x_t + (1 - ab) score) / sqrt(ab)."""
    mix = toys.mixture_2d()
    x = torch.randn(40, 2, generator=gen, dtype=torch.float64) * 1.5
    tweedie = (x + (1 - alpha_bar) * mix.score(x, alpha_bar)) / math.sqrt(alpha_bar)
    torch.testing.assert_close(mix.posterior_mean(x, alpha_bar), tweedie, rtol=1e-10, atol=1e-10)
    # and the optimal noise prediction is -sqrt(1 - ab) times the score
    torch.testing.assert_close(mix.eps_star(x, alpha_bar), -math.sqrt(1 - alpha_bar) * mix.score(x, alpha_bar))


def test_posterior_mean_and_class_posterior_by_monte_carlo(gen):
    """Self-normalised importance sampling with prior samples x0_i: E[f(x0) | x_t] ~ sum w_i f(x0_i)."""
    mix, ab = toys.mixture_2d(), 0.3
    x0, labels = mix.sample(400_000, gen)
    x_t = torch.tensor([[0.5, 0.2], [-0.6, -0.9]], dtype=torch.float64)
    logw = -((x_t[:, None, :] - math.sqrt(ab) * x0[None]) ** 2).sum(-1) / (2 * (1 - ab))
    w = torch.softmax(logw, dim=1)  # (2, N)
    ess = 1 / (w**2).sum(1)
    mc_mean = w @ x0
    se = ((w[..., None] * (x0[None] - mc_mean[:, None]) ** 2).sum(1) / ess[:, None]).sqrt()
    assert ((mc_mean - mix.posterior_mean(x_t, ab)).abs() < 4 * se).all()
    mc_class = torch.stack([w[:, labels == k].sum(1) for k in range(3)], 1)
    torch.testing.assert_close(mc_class, mix.class_posterior(x_t, ab), atol=0.01, rtol=0)


def test_mixture_samples_have_the_right_moments(gen):
    mix = toys.mixture_2d()
    x, labels = mix.sample(60_000, gen)
    for k in range(3):
        xk = x[labels == k]
        assert abs(len(xk) / 60_000 - 1 / 3) < 0.01
        assert (xk.mean(0) - mix.means[k]).abs().max() < 0.02
        assert (torch.cov(xk.T) - mix.covs[k]).abs().max() < 0.02


def test_gaussian_data_diffuses_in_closed_form(gen):
    tb2, ab = toys.gaussian_data(0.5, 0.3), 0.36
    x = torch.randn(10, 1, generator=gen, dtype=torch.float64)
    var = ab * 0.09 + 1 - ab
    expected = torch.distributions.Normal(0.6 * 0.5, math.sqrt(var)).log_prob(x[:, 0])
    torch.testing.assert_close(tb2.log_prob(x, ab), expected.double())
    # posterior mean of x0: m + s^2 sqrt(ab) / var (x - sqrt(ab) m)
    torch.testing.assert_close(tb2.posterior_mean(x, ab), 0.5 + 0.09 * 0.6 / var * (x - 0.6 * 0.5))


def test_component_is_the_class_conditional(gen):
    mix = toys.mixture_2d()
    x = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    c1 = mix.component(1)
    logp = c1.log_prob(x, 0.5)
    torch.testing.assert_close(logp, mix.log_prob(x, 0.5) + mix.class_posterior(x, 0.5)[:, 1].log() - math.log(1 / 3))
    with pytest.raises(ValueError, match="0..2"):
        mix.component(3)


def test_mixture_rejects_bad_input():
    with pytest.raises(ValueError, match="sum to 1"):
        toys.GaussianMixture(torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2), torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="positive definite"):
        toys.GaussianMixture(torch.zeros(1, 2), -torch.eye(2)[None], torch.ones(1))
    with pytest.raises(ValueError, match="covs"):
        toys.GaussianMixture(torch.zeros(2, 2), torch.eye(3).expand(2, 3, 3), torch.tensor([0.5, 0.5]))
    mix = toys.mixture_2d()
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        mix.score(torch.zeros(3, 3), 0.5)
    with pytest.raises(ValueError, match="alpha_bar"):
        mix.score(torch.zeros(3, 2), 1.5)
    with pytest.raises(ValueError, match="alpha_bar < 1"):
        mix.eps_star(torch.zeros(3, 2), 1.0)
    with pytest.raises(ValueError, match="std"):
        toys.gaussian_data(0.0, 0.0)
