"""Chapter 04's measurements: the recipe of the shipped digits VDMs and the bound recorded with them.

    python -m dlearn.zoo train vdm     # runs `train_vdm`, records `protocol_metrics`

`bound_on_split` is the negative ELBO of a trained `dlearn.vdm.VDM` on a split of the digits.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dlearn import datasets
from dlearn.distributions import nats_to_bits_per_dim
from dlearn.train import TrainConfig, fit
from dlearn.vdm import VDM, build_vdm


def bound_on_split(model: VDM, split: str = "test", draws: int = 20, seed: int = 2) -> float:
    """Mean negative ELBO in nats per image on a split, averaged over `draws` samples of (t, eps) per image."""
    x, _ = datasets.digits(split)
    g = torch.Generator().manual_seed(seed)
    with torch.enable_grad():  # the estimator differentiates the log-SNR with respect to t
        return torch.stack([model.neg_elbo_terms(x, g).neg_elbo.detach() for _ in range(draws)]).mean().item()


def protocol_metrics(model: VDM) -> dict[str, float]:
    """The zoo's record: the test-split bound (20 draws of t and noise per image) in nats and bits/dim."""
    nats = bound_on_split(model, "test", draws=20)
    return {"neg_elbo": nats, "neg_elbo_bpd": nats_to_bits_per_dim(nats, 64)}


def train_vdm(
    seed: int = 0,
    max_steps: int = 3000,
    learned: bool = True,
    logsnr_max: float = 10.0,
    logsnr_min: float = -6.0,
    channels=(32, 64),
    lr: float = 2e-3,
    parameterisation: str = "levels",
    augment: bool = False,
    augment_p: float = 0.5,
    progress: bool | None = None,
    checkpoint_dir: str | Path | None = None,
):
    """A recipe for the digits VDM: AdamW on the one-sample -ELBO, cosine decay, weight average, best validation bound.

    `learned`: a `MonotoneLogSNR` schedule trained with the model (endpoints included), else `LinearLogSNR`;
    either runs from log-SNR `logsnr_max` at t = 0 to `logsnr_min` at t = 1 (the learned one to start with).
    `augment`: train on `datasets.augment_digits` (a share `augment_p` of each batch transformed, the
    labels given to the denoiser); validation and test bounds are of the untransformed digits.
    `checkpoint_dir`: `fit` checkpoints there, and the same call again resumes the run (`TrainConfig`).
    """
    x_train, _ = datasets.digits("train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_vdm(learned, logsnr_max, logsnr_min, channels, parameterisation, augment)

    def loss_fn(m, batch, gen):
        if not augment:
            return m.neg_elbo_terms(batch[0], gen).neg_elbo.mean()
        x, labels = datasets.augment_digits(batch[0], augment_p, gen)
        return m.neg_elbo_terms(x, gen, aug=labels).neg_elbo.mean()

    cfg = TrainConfig(max_steps=max_steps, lr=lr, lr_schedule="cosine", ema=0.999, eval_every=200, seed=seed, progress=progress,
                      checkpoint_dir=checkpoint_dir)  # fmt: skip
    result = fit(model, loss_fn, (x_train,), cfg, val_fn=lambda m: bound_on_split(m, "val", draws=8, seed=1))
    return model.eval(), result
