"""Groundwork for chapter 04: the loss-weight identities and closed-form terms (rows D5, D14-D16, D18, D19, D24)."""

import math

import pytest
import torch

from dlearn import datasets, distributions, schedules, vdm


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
