"""Chapter 03's measurements: the recipe of the shipped HVAEs and the likelihood protocol recorded with them.

    python -m dlearn.zoo train hvae     # runs `train_hvae`, records `protocol_metrics`

Both are chapter 02's (`dlearn.studies.vae`) with the HVAE's bound; the recipe trains on
`dlearn.hvae.training_loss` (KL warm-up, free bits).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dlearn import datasets
from dlearn.hvae import HVAE, HVAEConfig, elbo_terms, iwae_bound, training_loss
from dlearn.studies import vae as vae_study
from dlearn.train import TrainConfig, TrainResult, fit


def train_hvae(
    seed: int = 0,
    max_steps: int = 8000,
    lr: float = 1e-3,
    ema: float | None = 0.999,
    warmup_steps: int = 0,
    free_bits: float = 0.0,
    progress: bool | None = None,
    checkpoint_dir: str | Path | None = None,
    **config_kwargs,
) -> tuple[HVAE, TrainResult]:
    """The zoo recipe for the HVAE: chapter 02's recipe (AdamW, cosine decay, weight average, best
    validation bound) on `training_loss`, optionally with KL warm-up and free bits.

    `checkpoint_dir`: `fit` checkpoints there, and the same call again resumes the run (`TrainConfig`)."""
    x_train, _ = datasets.digits("train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HVAE(HVAEConfig(**config_kwargs))

    def loss_fn(m, batch, gen, step):
        return training_loss(m, batch[0], gen, step, warmup_steps, free_bits)

    cfg = TrainConfig(
        max_steps=max_steps, batch_size=64, lr=lr, lr_schedule="cosine", ema=ema, eval_every=100, seed=seed, progress=progress,
        checkpoint_dir=checkpoint_dir,
    )  # fmt: skip
    result = fit(model, loss_fn, (x_train,), cfg, val_fn=lambda m: vae_study.validation_neg_elbo(m, elbo_terms))
    return model.eval(), result


def protocol_metrics(model: HVAE) -> dict[str, float]:
    """The zoo's record for the HVAE: chapter 02's `protocol_metrics` with chapter 03's bound."""
    return vae_study.protocol_metrics(model, elbo_fn=elbo_terms, iwae_fn=iwae_bound)
