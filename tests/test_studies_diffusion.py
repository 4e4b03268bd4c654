"""Chapter 05's measurements: the sample scores of the digits DDPM and its training recipe."""

import math

import pytest
import torch

from dlearn import datasets, diffusion, distributions, metrics
from dlearn.studies import diffusion as diffusion_study


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return diffusion.DigitsDDPM("eps", channels=(8, 16), num_steps=1000).eval()


@pytest.fixture(scope="module")
def tiny_class():
    torch.manual_seed(0)
    return diffusion.DigitsDDPM("eps", channels=(8, 16), num_classes=10).eval()


def test_quality_over_seeds_averages_sample_quality(tiny):
    out = diffusion_study.quality_over_seeds(tiny, "ddim", 3, seeds=(0, 1), n=64)
    singles = [diffusion_study.sample_quality(diffusion.generate(tiny, 64, "ddim", 3, seed=s, progress=False)) for s in (0, 1)]
    assert out["fd"] == [q["fd"] for q in singles] and out["memorisation"] == [q["memorisation"] for q in singles]
    assert out["fd_mean"] == pytest.approx(sum(out["fd"]) / 2)
    assert out["fd_std"] == pytest.approx(abs(out["fd"][0] - out["fd"][1]) / math.sqrt(2))
    clf = metrics.shipped_classifier()
    x = distributions.levels_to_unit(
        distributions.unit_to_levels(diffusion.generate(tiny, 64, "ddim", 3, seed=1, progress=False))
    )
    assert out["class_counts"][1] == torch.bincount(metrics.predict(clf, x).argmax(1), minlength=10).tolist()
    assert [sum(c) for c in out["class_counts"]] == [64, 64]
    with pytest.raises(ValueError, match="at least one sampling seed"):
        diffusion_study.quality_over_seeds(tiny, seeds=())


def test_quality_over_seeds_with_independent_labels(tiny_class):
    out = diffusion_study.quality_over_seeds(tiny_class, "ddim", 3, seeds=(0, 1), n=64, labels="iid")
    freq = torch.bincount(datasets.digits("train")[1], minlength=10).double()
    for s, fd in zip((0, 1), out["fd"], strict=True):
        lab = torch.multinomial(freq, 64, replacement=True, generator=torch.Generator().manual_seed(s))
        x = diffusion.generate(tiny_class, 64, "ddim", 3, seed=s, progress=False, labels=lab)
        assert fd == diffusion_study.sample_quality(x)["fd"]
    strat = diffusion_study.quality_over_seeds(tiny_class, "ddim", 3, seeds=(0,), n=64)
    assert strat["fd"] == [
        diffusion_study.sample_quality(diffusion.generate(tiny_class, 64, "ddim", 3, seed=0, progress=False))["fd"]
    ]


def test_study_bad_input(tiny, tiny_class):
    with pytest.raises(ValueError, match="num_classes must be None or 10"):
        diffusion_study.train_ddpm(max_steps=1, num_classes=9)
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        diffusion_study.quality_over_seeds(tiny, labels="iid")
    with pytest.raises(ValueError, match="'stratified' or 'iid'"):
        diffusion_study.quality_over_seeds(tiny_class, labels="uniform")


def test_train_ddpm_trains_a_class_conditional_model():
    model, result = diffusion_study.train_ddpm(max_steps=4, eval_every=4, channels=(8, 16), num_classes=10, progress=False)
    assert model.num_classes == 10 and result.steps == 4
    record = result.history[-1]
    assert math.isfinite(record["val"]) and math.isfinite(record["val_bound"]) and 0 <= record["val_memorisation"] <= 1
