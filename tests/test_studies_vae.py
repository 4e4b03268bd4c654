"""Chapter 02's measurements: the VAE's recipe, the likelihood protocol and the early-stopping metric."""

import math

import pytest
import torch

from dlearn import datasets, vae
from dlearn.studies import vae as vae_study


def _tiny_vae():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return vae.ConvVAE(latent_channels=1, channels=(8, 8), dropout=0.0).eval()


def test_evaluate_is_the_mean_bound_and_the_iwae_bound_with_one_seeded_generator():
    model = _tiny_vae()
    ev = vae_study.evaluate(model, "val", num_samples=20, seed=5, elbo_samples=3)
    assert set(ev) == {"neg_elbo", "neg_iwae_20"}
    x, _ = datasets.digits("val")
    g = torch.Generator().manual_seed(5)
    neg_elbo = torch.stack([vae.elbo_terms(model, x, g).neg_elbo for _ in range(3)]).mean(0).mean().item()
    neg_iwae = -vae.iwae_bound(model, x, 20, g).mean().item()
    assert ev == {"neg_elbo": neg_elbo, "neg_iwae_20": neg_iwae}
    assert ev["neg_iwae_20"] < ev["neg_elbo"] + 0.5  # the IWAE bound is the tighter one (up to noise)


def test_protocol_metrics_adds_bits_per_dimension(monkeypatch):
    calls = []

    def fake_evaluate(model, split, num_samples, seed, elbo_fn=None, iwae_fn=None):
        calls.append((split, num_samples, seed, elbo_fn, iwae_fn))
        return {"neg_elbo": 100.0, "neg_iwae_1000": 90.0}

    monkeypatch.setattr(vae_study, "evaluate", fake_evaluate)
    out = vae_study.protocol_metrics(None)
    assert calls == [("test", 1000, 0, None, None)]
    assert out["neg_elbo_bpd"] == pytest.approx(100.0 / (64 * math.log(2)))
    assert out["neg_iwae_1000_bpd"] == pytest.approx(90.0 / (64 * math.log(2)))


def test_validation_neg_elbo_uses_fixed_noise():
    model = _tiny_vae()
    a = vae_study.validation_neg_elbo(model, vae.elbo_terms)
    assert a == vae_study.validation_neg_elbo(model, vae.elbo_terms)
    x, _ = datasets.digits("val")
    g = torch.Generator().manual_seed(1234)
    assert a == torch.stack([vae.elbo_terms(model, x, g).neg_elbo for _ in range(4)]).mean().item()


def test_the_vae_recipe_runs_a_few_steps_and_is_seeded():
    model, result = vae_study.train_vae(seed=3, max_steps=4, progress=False, latent_channels=1, channels=(8, 8))
    assert isinstance(model, vae.ConvVAE) and not model.training
    assert result.steps == 4 and 0 < result.best_metric < 400  # nats per image; uniform is 64 log 17 = 181
    again, _ = vae_study.train_vae(seed=3, max_steps=4, progress=False, latent_channels=1, channels=(8, 8))
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
