"""Chapter 03's measurements: the HVAE's recipe and its likelihood protocol (chapter 02's, with the HVAE's bound)."""

import torch

from dlearn import hvae
from dlearn.studies import hvae as hvae_study
from dlearn.studies import vae as vae_study


def test_protocol_metrics_is_chapter_02s_with_the_hvae_bound(monkeypatch):
    calls = []

    def fake_evaluate(model, split, num_samples, seed, elbo_fn=None, iwae_fn=None):
        calls.append((split, num_samples, seed, elbo_fn, iwae_fn))
        return {"neg_elbo": 100.0, "neg_iwae_1000": 90.0}

    monkeypatch.setattr(vae_study, "evaluate", fake_evaluate)
    out = hvae_study.protocol_metrics(None)
    assert calls == [("test", 1000, 0, hvae.elbo_terms, hvae.iwae_bound)]
    assert set(out) == {"neg_elbo", "neg_iwae_1000", "neg_elbo_bpd", "neg_iwae_1000_bpd"}


def test_the_hvae_recipe_runs_a_few_steps_with_warmup_and_free_bits():
    kwargs = dict(max_steps=4, warmup_steps=3, free_bits=0.1, progress=False, z1_channels=1, z2_dim=2, channels=(8, 8), hidden=16)
    model, result = hvae_study.train_hvae(seed=2, **kwargs)
    assert isinstance(model, hvae.HVAE) and not model.training and model.config.z2_dim == 2
    assert result.steps == 4 and 0 < result.best_metric < 400  # nats per image; uniform is 64 log 17 = 181
    again, _ = hvae_study.train_hvae(seed=2, **kwargs)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
