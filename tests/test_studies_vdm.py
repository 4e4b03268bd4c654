"""Chapter 04's measurements: the digits VDM's recipe and its bound on a split."""

import math

from dlearn.studies import vdm as vdm_study


def test_the_vdm_recipe_runs_a_few_steps():
    model, result = vdm_study.train_vdm(max_steps=10, progress=False)
    assert result.steps == 10 and math.isfinite(result.best_metric)
    assert 0 < vdm_study.bound_on_split(model, "val", draws=1) < 400  # nats per image; uniform is 181


def test_the_augmented_vdm_recipe_runs_a_few_steps():
    model, result = vdm_study.train_vdm(max_steps=10, augment=True, progress=False)
    assert result.steps == 10 and 0 < vdm_study.bound_on_split(model, "val", draws=1) < 400
