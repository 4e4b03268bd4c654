import math

import pytest
import torch

from dlearn import nets


def test_mlp_shapes_and_errors(gen):
    mlp = nets.MLP(3, (16, 16), 2, dropout=0.1)
    assert mlp(torch.randn(5, 3, generator=gen)).shape == (5, 2)
    with pytest.raises(ValueError, match="3 features"):
        mlp(torch.randn(5, 4))


def test_sinusoidal_embedding_values():
    t = torch.tensor([0.0, 1.0, 250.0])
    emb = nets.sinusoidal_embedding(t, 8)
    assert emb.shape == (3, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # cos 0 = 1, sin 0 = 0
    freqs = torch.tensor([10_000 ** (-i / 4) for i in range(4)])
    torch.testing.assert_close(emb[2], torch.cat([torch.cos(250 * freqs), torch.sin(250 * freqs)]))
    # each (cos, sin) pair lies on the unit circle
    torch.testing.assert_close(emb[:, :4] ** 2 + emb[:, 4:] ** 2, torch.ones(3, 4))
    with pytest.raises(ValueError, match="even"):
        nets.sinusoidal_embedding(t, 7)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        nets.sinusoidal_embedding(t[:, None], 8)


def test_fourier_features_are_fixed_and_periodic():
    ff = nets.FourierFeatures(16, scale=2.0, seed=3)
    assert not list(ff.parameters())  # nothing learnable
    v = torch.tensor([0.3, -1.2])
    emb = ff(v)
    torch.testing.assert_close(emb[:, :8] ** 2 + emb[:, 8:] ** 2, torch.ones(2, 8))
    torch.testing.assert_close(emb[:, 8:], torch.sin(2 * math.pi * v[:, None] * ff.freqs))
    assert torch.equal(nets.FourierFeatures(16, 2.0, seed=3).freqs, ff.freqs)


@pytest.mark.parametrize("kwargs,extra", [({}, {}), ({"num_classes": 10}, {"labels": True}), ({"cond_dim": 5}, {"cond": True})])
def test_conv_denoiser_shapes_and_gradients(kwargs, extra, gen):
    net = nets.ConvDenoiser(in_ch=1, out_ch=17, channels=(16, 32), emb_dim=32, **kwargs)
    x, t = torch.randn(4, 1, 8, 8, generator=gen), torch.rand(4, generator=gen)
    inputs = {}
    if extra.get("labels"):
        inputs["labels"] = torch.tensor([0, 3, 9, 10])  # 10 = no label
    if extra.get("cond"):
        inputs["cond"] = torch.randn(4, 5, generator=gen)
    out = net(x, t, **inputs)
    assert out.shape == (4, 17, 8, 8)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)


def test_conv_denoiser_depends_on_its_inputs(gen):
    net = nets.ConvDenoiser(channels=(16, 32), emb_dim=32, num_classes=10).eval()
    x, t = torch.randn(2, 1, 8, 8, generator=gen), torch.full((2,), 0.5)
    labels = torch.tensor([1, 1])
    base = net(x, t, labels)
    assert not torch.allclose(base, net(x, t * 2, labels))
    assert not torch.allclose(base, net(x, t, labels + 1))
    # images in a batch do not interact
    torch.testing.assert_close(net(x[:1], t[:1], labels[:1]), base[:1])


def test_conv_denoiser_errors():
    net = nets.ConvDenoiser(channels=(8, 16), emb_dim=16, num_classes=10)
    x, t = torch.zeros(2, 1, 8, 8), torch.zeros(2)
    with pytest.raises(ValueError, match="8, 8"):
        net(torch.zeros(2, 1, 16, 16), t, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="one value per image"):
        net(x, torch.zeros(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="pass labels"):
        net(x, t)
    with pytest.raises(ValueError, match="0..10"):
        net(x, t, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="without cond_dim"):
        net(x, t, torch.zeros(2, dtype=torch.long), cond=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="without num_classes"):
        nets.ConvDenoiser(channels=(8, 16), emb_dim=16)(x, t, torch.zeros(2, dtype=torch.long))


def test_count_parameters():
    mlp = nets.MLP(2, (3,), 1)
    assert nets.count_parameters(mlp) == 2 * 3 + 3 + 3 * 1 + 1
    mlp.net[0].requires_grad_(False)
    assert nets.count_parameters(mlp) == 4 and nets.count_parameters(mlp, trainable_only=False) == 13


def test_an_optional_condition_reads_as_zeros_and_a_required_one_is_asked_for():
    x, t = torch.randn(3, 1, 8, 8), torch.arange(3)
    torch.manual_seed(0)
    net = nets.ConvDenoiser(channels=(8, 16), emb_dim=16, cond_dim=4, cond_optional=True)
    torch.testing.assert_close(net(x, t), net(x, t, cond=torch.zeros(3, 4)), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"cond must have shape \(3, 4\), got None"):
        nets.ConvDenoiser(channels=(8, 16), emb_dim=16, cond_dim=4)(x, t)
