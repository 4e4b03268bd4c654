"""Chapter 03's checks H1-H4: the Markovian HVAE on TB1's two-level model (exact), and the digits HVAE."""

import math

import pytest
import torch

from dlearn import datasets, elbo, hvae, toys


@pytest.fixture
def tb1_2():
    return toys.two_level_linear_gaussian()


def test_check_H1_ancestral_samples_of_the_chain(tb1_2, gen):
    x, z1, z2 = tb1_2.sample(100_000, gen)
    k2, k1, d = tb1_2.dims
    a, b = tb1_2.a, tb1_2.b_weight
    expected = b @ (a @ a.T + tb1_2.s1 * torch.eye(k1, dtype=torch.float64)) @ b.T + tb1_2.s0 * torch.eye(d, dtype=torch.float64)
    assert torch.linalg.norm(torch.cov(x.T) - expected) / torch.linalg.norm(expected) < 0.02


def test_check_H2_the_true_posterior_is_a_markov_encoder(tb1_2, gen):
    x, *_ = tb1_2.sample(5, gen)
    q1, q2 = hvae.markov_posterior_factors(tb1_2, x)
    # the product of the two factors is the joint posterior ...
    pm, pc = tb1_2.posterior(x)
    qm, qc = hvae.markov_q_joint(q1, q2)
    torch.testing.assert_close(qm, pm, atol=1e-10, rtol=0)
    torch.testing.assert_close(qc, pc, atol=1e-10, rtol=0)
    # ... so the bound is tight: ELBO - log p(x) = 0, and even each sample's log-ratio equals log p(x)
    torch.testing.assert_close(hvae.markov_elbo_closed_form(tb1_2, x, q1, q2), tb1_2.log_marginal(x), atol=1e-10, rtol=0)
    est, se = hvae.markov_elbo_monte_carlo(tb1_2, x, q1, q2, 50, gen)
    assert (est - tb1_2.log_marginal(x)).abs().max() < 1e-10 and se.max() < 1e-10


def test_check_H3_the_bound_closed_form_monte_carlo_and_kl(tb1_2, gen):
    x, *_ = tb1_2.sample(6, gen)
    (m1, c1), (a, c, c2) = hvae.markov_posterior_factors(tb1_2, x)
    q1, q2 = (m1 + 0.3, 1.7 * c1), (0.8 * a, c + 0.2, 0.6 * c2)  # a wrong encoder
    closed = hvae.markov_elbo_closed_form(tb1_2, x, q1, q2)
    est, se = hvae.markov_elbo_monte_carlo(tb1_2, x, q1, q2, 20_000, gen)
    assert ((est - closed).abs() < 3 * se).sum() >= 5
    qm, qc = hvae.markov_q_joint(q1, q2)
    pm, pc = tb1_2.posterior(x)
    kl = elbo.kl_gaussians(qm, qc, pm, pc)
    torch.testing.assert_close(tb1_2.log_marginal(x) - closed, kl, atol=1e-10, rtol=0)
    assert (kl > 0).all()


def test_check_H4_a_vdm_encoder_has_no_parameters():
    """H4: the VDM is an HVAE whose encoder is fixed. The HVAE learns its encoder; a fixed linear-Gaussian
    encoder (x_t = sqrt(a) x_{t-1} + sqrt(1 - a) eps) has nothing to learn."""
    model = hvae.HVAE(z1_channels=1, z2_dim=2, channels=(8, 8), hidden=16)
    learned_encoder = [p for n, p in model.named_parameters() if n.split(".")[0] in ("encoder", "q1", "q2")]
    assert sum(p.numel() for p in learned_encoder) > 0
    fixed = hvae.FixedGaussianEncoder(one_minus_betas=torch.tensor([0.9, 0.8]))
    assert sum(p.numel() for p in fixed.parameters()) == 0
    x = torch.randn(3, 5, dtype=torch.float64)
    z = fixed(x, torch.Generator().manual_seed(0))
    assert [t.shape for t in z] == [(3, 5), (3, 5)]


def test_digits_hvae_bound_terms_and_iwae(gen):
    x, _ = datasets.digits("val")
    for inference in ("markov", "top_down"):
        model = hvae.HVAE(z1_channels=1, z2_dim=2, channels=(8, 8), hidden=16, inference=inference).eval()
        t = hvae.elbo_terms(model, x[:8], gen)
        torch.testing.assert_close(t.neg_elbo, t.prior + t.reconstruction)
        assert t.neg_elbo.shape == (8,) and torch.isfinite(t.neg_elbo).all()
        # IWAE with K samples >= the mean one-sample ELBO (in expectation; with a margin for noise)
        elbo_mean = -torch.stack([hvae.elbo_terms(model, x[:8], gen).neg_elbo for _ in range(200)]).mean(0)
        iwae = hvae.iwae_bound(model, x[:8], 200, gen)
        assert (iwae > elbo_mean - 0.5).all()


def test_top_down_kl_is_analytic_and_matches_monte_carlo(gen):
    model = hvae.HVAE(z1_channels=1, z2_dim=2, channels=(8, 8), hidden=16, inference="top_down").eval()
    x, _ = datasets.digits("test")
    x = x[:4]
    # analytic KLs in the one-sample bound vs the Monte Carlo log q - log p over many draws
    d = hvae._draw(model, x, 20_000, gen)
    mc_kl = (d["log_q_z"] - d["log_p_z"]).mean(0)
    analytic = (d["kl1_dims"].sum(-1) + d["kl2_dims"].sum(-1)).mean(0)
    se = (d["log_q_z"] - d["log_p_z"]).std(0) / math.sqrt(20_000)
    assert ((mc_kl - analytic).abs() < 4 * se + 1e-3).all()


def test_training_loss_reduces_to_the_elbo_and_bad_config():
    model = hvae.HVAE(z1_channels=1, z2_dim=2, channels=(8, 8), hidden=16).eval()  # no dropout
    x, _ = datasets.digits("val")
    a = hvae.training_loss(model, x[:16], torch.Generator().manual_seed(3), step=0)
    b = hvae.elbo_terms(model, x[:16], torch.Generator().manual_seed(3)).neg_elbo.mean()
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="inference"):
        hvae.HVAEConfig(inference="bottom_up")
    with pytest.raises(ValueError, match="grey levels"):
        hvae.elbo_terms(model, x[:2].float() / 16)


def test_the_shipped_hvae_uses_both_levels():
    """Its recorded bound against the VAE's and the no-warm-up run's: tests/test_records.py."""
    from dlearn import zoo

    model = zoo.load("hvae")
    x, _ = datasets.digits("test")
    g = torch.Generator().manual_seed(0)
    t = hvae.elbo_terms(model, x, g)
    assert t.parts["kl1"].mean() > 1 and t.parts["kl2"].mean() > 1  # neither level collapsed


def test_posterior_z2_is_the_top_down_encoder(gen):
    model = hvae.HVAE(z1_channels=1, z2_dim=2, channels=(8, 8), hidden=16).eval()
    x, _ = datasets.digits("val")
    mean, logvar = model.posterior_z2(x[:3])
    assert mean.shape == logvar.shape == (3, 2)
    with pytest.raises(ValueError, match="top-down"):
        hvae.HVAE(z1_channels=1, z2_dim=2, channels=(8, 8), hidden=16, inference="markov").posterior_z2(x[:3])


@torch.no_grad()
def test_iwae_bound_is_the_log_mean_of_the_weights_on_the_same_draws():
    """hvae.iwae_bound against its definition on the same K joint draws of (z1, z2) ~ q: log((1/K) sum_k w_k),
    w_k = p(x, z_k) / q(z_k | x) exponentiated here in float64 (log w is about -200 nats for an untrained model,
    far from float64's underflow), between the mean and the max of log w; with K = 1, in Markov inference, it is
    the one-sample ELBO of `elbo_terms` at the same draw (there the KL term is log q - log p at the draw)."""
    x, _ = datasets.digits("val")
    x = x[:6]
    for inference in ("markov", "top_down"):
        torch.manual_seed(0)
        model = hvae.HVAE(z1_channels=1, z2_dim=2, channels=(8, 8), hidden=16, inference=inference).eval()
        for k in (1, 5, 50):
            iwae = hvae.iwae_bound(model, x, k, torch.Generator().manual_seed(k))
            d = hvae._draw(model, x, k, torch.Generator().manual_seed(k))  # the same draws
            log_w = (d["log_lik"] + d["log_p_z"] - d["log_q_z"]).double()  # (K, B)
            assert log_w.shape == (k, 6) and log_w.min() > -700
            torch.testing.assert_close(iwae.double(), torch.log(torch.exp(log_w).mean(0)), atol=1e-4, rtol=0)
            assert (iwae >= log_w.mean(0) - 1e-4).all() and (iwae <= log_w.max(0).values + 1e-4).all()
            if k > 1:
                assert (iwae < log_w.max(0).values - 1e-3).all()  # the K weights differ: the mean is below the max
        if inference == "markov":
            one = hvae.iwae_bound(model, x, 1, torch.Generator().manual_seed(7))
            torch.testing.assert_close(one, -hvae.elbo_terms(model, x, torch.Generator().manual_seed(7)).neg_elbo)
