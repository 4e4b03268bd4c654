import numpy as np
import pytest
import scipy.linalg
import torch

from dlearn import metrics


def test_frechet_distance_closed_forms():
    f = metrics.frechet_distance_gaussians
    d = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert f(d(1.0), d([4.0]), d(-1.0), d([9.0])) == pytest.approx(4 + (2 - 3) ** 2)
    with pytest.raises(ValueError, match=r"\(D, D\)"):
        f(d(1.0), d(4.0), d(-1.0), d(9.0))
    # commuting (diagonal) covariances: sum over dims of the 1-D formula
    ca, cb = torch.diag(d(1.0, 4.0, 0.25)), torch.diag(d(9.0, 1.0, 0.25))
    assert f(d(0, 0, 0), ca, d(1, 1, 1), cb) == pytest.approx(3 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0)


def test_frechet_distance_matches_scipy_sqrtm(gen):
    a = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    ca, cb = a @ a.T + 0.1 * torch.eye(5), b @ b.T + 0.1 * torch.eye(5)
    mu_a, mu_b = torch.randn(5, generator=gen, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    covmean = scipy.linalg.sqrtm(ca.numpy() @ cb.numpy()).real
    expected = float(((mu_a - mu_b) ** 2).sum() + np.trace(ca.numpy() + cb.numpy() - 2 * covmean))
    assert metrics.frechet_distance_gaussians(mu_a, ca, mu_b, cb) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_samples(gen):
    a = torch.randn(20_000, 3, generator=gen, dtype=torch.float64)
    b = 2 * torch.randn(20_000, 3, generator=gen, dtype=torch.float64) + 1
    assert metrics.frechet_distance(a, b) == pytest.approx(3 * 1 + 3 * (2 - 1) ** 2, rel=0.03)
    assert metrics.frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    assert metrics.frechet_distance(a, b) == pytest.approx(metrics.frechet_distance(b, a), rel=1e-9)
    with pytest.raises(ValueError, match="feature sizes"):
        metrics.frechet_distance(a, b[:, :2])
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.frechet_distance(a[:1], b)


def test_iou():
    a = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(metrics.iou(a, b), torch.tensor([1 / 3, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(metrics.iou(a, a), torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="boolean"):
        metrics.iou(a.float(), b)
    with pytest.raises(ValueError, match="one shape"):
        metrics.iou(a, b[:2])


def test_digit_mask():
    levels = torch.tensor([[0, 8, 9, 16]])
    assert metrics.digit_mask(levels).tolist() == [[False, False, True, True]]
    with pytest.raises(ValueError, match="0..16"):
        metrics.digit_mask(levels + 1)


def test_classifier_shapes_and_errors(gen):
    clf = metrics.DigitClassifier().eval()
    x = torch.rand(5, 1, 8, 8, generator=gen) * 2 - 1
    assert clf(x).shape == (5, 10) and clf.features(x).shape == (5, metrics.FEATURE_DIM)
    probs = metrics.predict(clf, x)
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    assert metrics.features(clf, x).dtype == torch.float64
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        clf(torch.zeros(5, 64))
    with pytest.raises(ValueError, match="float"):
        clf(torch.zeros(5, 1, 8, 8, dtype=torch.long))


def test_accuracy():
    assert metrics.accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1])) == 0.5
    with pytest.raises(ValueError, match="labels"):
        metrics.accuracy(torch.zeros(2, 2), torch.zeros(3))


def test_random_shift_moves_content_and_pads_with_background(gen):
    x = torch.full((200, 1, 8, 8), -1.0)
    x[:, :, 3, 4] = 1.0
    shifted = metrics.random_shift(x, gen)
    pos = (shifted[:, 0] == 1).nonzero()[:, 1:]  # (row, col) of the bright pixel per image
    assert len(pos) == 200
    assert set(map(tuple, pos.tolist())) == {(r, c) for r in (2, 3, 4) for c in (3, 4, 5)}
    assert ((shifted == -1) | (shifted == 1)).all()


def test_energy_distance(gen):
    a = torch.randn(1500, 2, generator=gen, dtype=torch.float64)
    b = torch.randn(1500, 2, generator=gen, dtype=torch.float64)
    c = torch.randn(1500, 2, generator=gen, dtype=torch.float64) + torch.tensor([1.0, 0.0], dtype=torch.float64)
    same, shifted = metrics.energy_distance(a, b), metrics.energy_distance(a, c)
    assert abs(same) < 0.01 and shifted > 0.3
    # 1-D closed form for N(0,1) vs N(1,1): 2 E|X-Y| - E|X-X'| - E|Y-Y'| with |N(m, 2)| means
    import math

    expected = 2 * (math.sqrt(2) * math.sqrt(2 / math.pi) * math.exp(-1 / 4) + 1 * math.erf(1 / 2)) - 2 * 2 / math.sqrt(math.pi)
    one_d = metrics.energy_distance(a[:, :1], c[:, :1], max_points=1500)
    assert one_d == pytest.approx(expected, abs=0.05)
    with pytest.raises(ValueError, match="one dimension"):
        metrics.energy_distance(a, c[:, :1])


def test_mean_se_and_paired_rank():
    m, se = metrics.mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and se == pytest.approx((5 / 3) ** 0.5 / 2)  # sample variance 5/3, n = 4
    assert metrics.paired_rank([1.0, 2.0, 3.0], [1.1, 2.1, 3.2])[2] == "lower"  # differences -0.1, -0.1, -0.2
    assert metrics.paired_rank([3.0, 2.0, 1.0], [1.0, 2.0, 3.0])[2] == "within noise"  # mean 0
    assert metrics.paired_rank([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])[:2] == pytest.approx((2.0, 3**-0.5))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.mean_se([1.0])
    with pytest.raises(ValueError, match="same images"):
        metrics.paired_rank([1.0, 2.0], [1.0, 2.0, 3.0])
