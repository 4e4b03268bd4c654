"""Chapter 00's measuring instrument: the recipe of the shipped digits classifier and its metrics.

    python -m dlearn.zoo train digits_classifier     # runs `train_classifier`, records `classifier_metrics`
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dlearn import datasets
from dlearn.metrics import DigitClassifier, accuracy, features, frechet_distance, predict, random_shift
from dlearn.train import TrainConfig, TrainResult, fit


def train_classifier(seed: int = 0, max_steps: int = 4000, progress: bool | None = None,
                     checkpoint_dir: str | Path | None = None) -> tuple[DigitClassifier, TrainResult]:  # fmt: skip
    """The zoo recipe of "digits_classifier": train split with 1-pixel shifts, best validation accuracy.

    `checkpoint_dir`: `fit` checkpoints there, and the same call again resumes the run (`TrainConfig`)."""
    x_train, y_train = datasets.digits("train", form="unit")
    x_val, y_val = datasets.digits("val", form="unit")
    with torch.random.fork_rng(devices=[]):  # seeded initial weights, caller's random state untouched
        torch.manual_seed(seed)
        model = DigitClassifier()

    def loss_fn(m, batch, gen):
        x, y = batch
        return F.cross_entropy(m(random_shift(x, gen)), y, label_smoothing=0.05)

    config = TrainConfig(
        max_steps=max_steps, batch_size=64, lr=2e-3, weight_decay=1e-3, eval_every=100, patience=15,
        higher_is_better=True, seed=seed, progress=progress, checkpoint_dir=checkpoint_dir,
    )  # fmt: skip
    result = fit(model, loss_fn, (x_train, y_train), config, val_fn=lambda m: accuracy(m(x_val), y_val))
    return model.eval(), result


def classifier_metrics(model: DigitClassifier) -> dict[str, float]:
    """The numbers the zoo records for the classifier: test accuracy and the train-vs-test FD floor."""
    x_train, _ = datasets.digits("train", form="unit")
    x_test, y_test = datasets.digits("test", form="unit")
    return {
        "test_accuracy": accuracy(predict(model, x_test), y_test),
        "fd_floor_train_vs_test": frechet_distance(features(model, x_train), features(model, x_test)),
    }
