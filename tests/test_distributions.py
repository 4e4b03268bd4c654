import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dlearn import distributions as D

Normal = torch.distributions.Normal


@pytest.mark.parametrize("shape", [(7, 5), (4, 1, 8, 8)])
def test_log_normal_diag_matches_torch_distributions(shape, gen):
    x, mean = torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(shape, generator=gen, dtype=torch.float64)
    logvar = torch.randn(shape, generator=gen, dtype=torch.float64)
    expected = Normal(mean, (0.5 * logvar).exp()).log_prob(x).reshape(shape[0], -1).sum(1)
    torch.testing.assert_close(D.log_normal_diag(x, mean, logvar), expected, rtol=1e-12, atol=1e-12)


def test_log_normal_diag_broadcasts_parameters_but_not_beyond_x():
    x = torch.zeros(3, 4, dtype=torch.float64)
    torch.testing.assert_close(D.log_normal_diag(x, 0.0, 0.0), torch.full((3,), -2 * math.log(2 * math.pi), dtype=torch.float64))
    with pytest.raises(ValueError, match="broadcast"):
        D.log_normal_diag(x, torch.zeros(2, 3, 4), 0.0)


@pytest.mark.parametrize("shape", [(6, 16), (3, 2, 4, 4)])
def test_kl_normal_diag_matches_torch_distributions(shape, gen):
    r = lambda: torch.randn(shape, generator=gen, dtype=torch.float64)  # noqa: E731
    mq, lq, mp, lp = r(), r(), r(), r()
    expected = torch.distributions.kl_divergence(Normal(mq, (0.5 * lq).exp()), Normal(mp, (0.5 * lp).exp()))
    torch.testing.assert_close(D.kl_normal_diag(mq, lq, mp, lp), expected.reshape(shape[0], -1).sum(1))
    # default p is N(0, I): the VAE's closed form 1/2 sum (mu^2 + var - log var - 1)
    torch.testing.assert_close(D.kl_normal_diag(mq, lq), 0.5 * (mq**2 + lq.exp() - lq - 1).reshape(shape[0], -1).sum(1))


def test_kl_is_zero_iff_equal(gen):
    m, lv = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    torch.testing.assert_close(D.kl_normal_diag(m, lv, m, lv), torch.zeros(4))
    assert (D.kl_normal_diag(m, lv, m + 0.1, lv) > 0).all()


def test_levels_roundtrip_and_range_checks():
    levels = torch.arange(17)
    unit = D.levels_to_unit(levels)
    assert unit[0] == -1 and unit[-1] == 1 and unit[8] == 0
    assert torch.equal(D.unit_to_levels(unit), levels)
    with pytest.raises(ValueError, match="0..16"):
        D.levels_to_unit(torch.tensor([0, 17]))
    with pytest.raises(ValueError, match="0..16"):
        D.check_levels(torch.tensor([-1]))
    with pytest.raises(ValueError, match="integer"):
        D.check_levels(torch.tensor([0.5]))
    with pytest.raises(TypeError):
        D.check_levels([1, 2])


def test_categorical_pixels_is_cross_entropy_and_normalised(gen):
    x = torch.randint(0, 17, (5, 1, 8, 8), generator=gen)
    logits = torch.randn(5, 17, 1, 8, 8, generator=gen, dtype=torch.float64)
    expected = torch.distributions.Categorical(logits=logits.movedim(1, -1)).log_prob(x).reshape(5, -1).sum(1)
    torch.testing.assert_close(D.log_categorical_pixels(x, logits), expected)
    # summing the probability of every level of a one-pixel image gives 1
    one = torch.arange(17).reshape(17, 1)
    lg = torch.randn(1, 17, 1, generator=gen, dtype=torch.float64).expand(17, 17, 1)
    assert torch.logsumexp(D.log_categorical_pixels(one, lg), 0).abs() < 1e-12
    with pytest.raises(ValueError, match="shape"):
        D.log_categorical_pixels(x, logits[:, :16])
    with pytest.raises(ValueError, match="0..16"):
        D.log_categorical_pixels(x + 17, logits)


def _all_levels_logp(fn, mean, scale_param):
    """log P(k) for k = 0..16 of a one-pixel distribution."""
    x = torch.arange(17).reshape(17, 1)
    return fn(x, mean.expand(17, 1), scale_param.expand(17, 1))


@settings(deadline=None, max_examples=40)
@given(mean=st.floats(-1.5, 1.5), log_scale=st.floats(-7.0, 3.0))
def test_discretized_distributions_sum_to_one(mean, log_scale):
    m, s = torch.tensor([[mean]], dtype=torch.float64), torch.tensor([[log_scale]], dtype=torch.float64)
    for fn, p in ((D.log_discretized_gaussian, 2 * s), (D.log_discretized_logistic, s)):
        logp = _all_levels_logp(fn, m, p)
        assert torch.isfinite(logp).all()  # no bin underflows to -inf, even far in the tails
        assert abs(torch.logsumexp(logp, 0).item()) < 1e-9


def test_discretized_gaussian_bins_match_the_cdf(gen):
    mean = torch.tensor([[0.13]], dtype=torch.float64)
    logvar = torch.tensor([[math.log(0.2**2)]], dtype=torch.float64)
    logp = _all_levels_logp(D.log_discretized_gaussian, mean, logvar)
    normal = Normal(torch.tensor(0.13, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64))
    edges = torch.tensor([-math.inf] + [k / 8 - 1 + 1 / 16 for k in range(16)] + [math.inf], dtype=torch.float64)
    expected = normal.cdf(edges[1:]) - normal.cdf(edges[:-1])
    torch.testing.assert_close(logp.exp(), expected, rtol=1e-10, atol=1e-14)


def test_discretized_logistic_bins_match_the_cdf():
    mean, log_s = torch.tensor([[-0.4]], dtype=torch.float64), torch.tensor([[math.log(0.1)]], dtype=torch.float64)
    logp = _all_levels_logp(D.log_discretized_logistic, mean, log_s)
    cdf = lambda v: torch.sigmoid((v + 0.4) / 0.1)  # noqa: E731
    edges = torch.tensor([-math.inf] + [k / 8 - 1 + 1 / 16 for k in range(16)] + [math.inf], dtype=torch.float64)
    torch.testing.assert_close(logp.exp(), cdf(edges[1:]) - cdf(edges[:-1]), rtol=1e-10, atol=1e-14)


def test_discretized_decoders_are_stable_in_the_tails_and_differentiable():
    # a sharp decoder centred on its level: log-prob near 0, finite gradients everywhere
    x = torch.tensor([[0, 8, 16, 3]])
    mean = D.levels_to_unit(x).double().requires_grad_(True)
    sharp = (
        (D.log_discretized_gaussian, torch.full_like(mean, -20.0)),
        (D.log_discretized_logistic, torch.full_like(mean, -10.0)),
    )
    for fn, p in sharp:
        logp = fn(x, mean, p)
        assert logp.item() > -1e-6
        # a far-off mean: tiny but finite probability
        far = fn(x, mean.detach() * 0 + 0.9, p)
        assert torch.isfinite(far) and far.item() < -100
        (g,) = torch.autograd.grad(fn(x, mean * 0.97, p).sum(), mean)
        assert torch.isfinite(g).all()


def test_discretized_require_matching_shapes():
    with pytest.raises(ValueError, match="one shape"):
        D.log_discretized_gaussian(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4), torch.zeros(1))


def test_bits_per_dim_conversions():
    assert D.nats_to_bits_per_dim(64 * math.log(17), 64) == pytest.approx(math.log2(17))
    assert D.bits_per_dim_to_nats(D.nats_to_bits_per_dim(123.4, 64), 64) == pytest.approx(123.4)
    with pytest.raises(ValueError, match="positive"):
        D.nats_to_bits_per_dim(1.0, 0)


def test_pixel_histogram_baseline():
    from dlearn import datasets

    train, _ = datasets.digits("train")
    logits = D.pixel_histogram_logits(train)
    assert logits.shape == (1, 17, 1, 8, 8)
    torch.testing.assert_close(logits.exp().sum(1), torch.ones(1, 1, 8, 8, dtype=torch.float64))
    # counting by hand for one pixel
    k = train[:, 0, 3, 4]
    expected = (torch.bincount(k, minlength=17).double() + 1) / (len(k) + 17)
    torch.testing.assert_close(logits[0, :, 0, 3, 4].exp(), expected)
    # a huge pseudo-count is the uniform distribution
    flat = D.pixel_histogram_logits(train, pseudo_count=1e12)
    torch.testing.assert_close(flat.exp(), torch.full_like(flat, 1 / 17))
    with pytest.raises(ValueError, match="pseudo_count"):
        D.pixel_histogram_logits(train, 0.0)
