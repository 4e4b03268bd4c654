"""Chapter 02's measurements: the recipe of the shipped VAEs and the likelihood protocol recorded with them.

    python -m dlearn.zoo train vae     # runs `train_vae`, records `protocol_metrics`

`evaluate` is the protocol (negative ELBO and negative IWAE-K bound on a split); chapter 03's HVAE
uses it with its own bound, and its recipe the early-stopping metric `validation_neg_elbo`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dlearn import datasets
from dlearn.distributions import nats_to_bits_per_dim
from dlearn.train import TrainConfig, TrainResult, fit
from dlearn.vae import ConvVAE, VAEConfig, elbo_terms, iwae_bound


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: str = "test",
    num_samples: int = 1000,
    seed: int = 0,
    elbo_samples: int = 10,
    elbo_fn=None,
    iwae_fn=None,
) -> dict[str, float]:
    """The likelihood protocol: mean negative ELBO and negative IWAE-K bound on a split, in nats per image.

    The ELBO is averaged over `elbo_samples` draws per image (its expectation, not one noisy draw).
    `elbo_fn` and `iwae_fn` default to chapter 02's `elbo_terms` and `iwae_bound`; the HVAE passes its own.
    """
    elbo_fn, iwae_fn = elbo_fn or elbo_terms, iwae_fn or iwae_bound
    x, _ = datasets.digits(split)
    g = torch.Generator().manual_seed(seed)
    model.eval()
    neg_elbo = torch.stack([elbo_fn(model, x, g).neg_elbo for _ in range(elbo_samples)]).mean(0)
    neg_iwae = -iwae_fn(model, x, num_samples, g)
    return {"neg_elbo": neg_elbo.mean().item(), f"neg_iwae_{num_samples}": neg_iwae.mean().item()}


def protocol_metrics(model: nn.Module, elbo_fn=None, iwae_fn=None) -> dict[str, float]:
    """What the zoo records for a latent-variable model on the book's likelihood protocol: test-split
    negative ELBO and negative IWAE-1000 bound, in nats per image and in bits per dimension."""
    ev = evaluate(model, "test", 1000, seed=0, elbo_fn=elbo_fn, iwae_fn=iwae_fn)
    ev.update({f"{k}_bpd": nats_to_bits_per_dim(v, 64) for k, v in list(ev.items())})
    return ev


def train_vae(
    seed: int = 0,
    max_steps: int = 8000,
    lr: float = 1e-3,
    ema: float | None = 0.999,
    warmup_steps: int = 0,
    progress: bool | None = None,
    checkpoint_dir: str | Path | None = None,
    **config_kwargs,
) -> tuple[ConvVAE, TrainResult]:
    """The zoo recipe for a VAE: AdamW on the negative ELBO, cosine learning-rate decay, an exponential
    moving average of the weights, and the checkpoint with the best validation negative ELBO.

    `warmup_steps`: KL warm-up, as chapter 03's HVAE recipe: the loss is reconstruction + kappa * KL, the KL weight
    kappa rising linearly from 1 / warmup_steps to 1 over the first `warmup_steps` steps (0: the plain negative ELBO
    throughout). The early-stopping metric is always the true bound (kappa = 1).

    `checkpoint_dir`: `fit` checkpoints there, and the same call again resumes the run (`TrainConfig`)."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    x_train, _ = datasets.digits("train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ConvVAE(VAEConfig(**config_kwargs))

    def loss_fn(m, batch, gen):
        return elbo_terms(m, batch[0], gen).neg_elbo.mean()

    def warmup_loss_fn(m, batch, gen, step):
        kl_weight = min(1.0, (step + 1) / warmup_steps)  # as dlearn.hvae.training_loss
        t = elbo_terms(m, batch[0], gen)
        return (kl_weight * t.prior + t.reconstruction).mean()

    cfg = TrainConfig(
        max_steps=max_steps, batch_size=64, lr=lr, lr_schedule="cosine", ema=ema, eval_every=100, seed=seed, progress=progress,
        checkpoint_dir=checkpoint_dir,
    )  # fmt: skip
    result = fit(model, warmup_loss_fn if warmup_steps > 0 else loss_fn, (x_train,), cfg,
                 val_fn=lambda m: validation_neg_elbo(m, elbo_terms))  # fmt: skip
    return model.eval(), result


def validation_neg_elbo(model: nn.Module, elbo_fn, samples: int = 4) -> float:
    """Mean negative ELBO on the validation split (4 draws per image, fixed noise): the early-stopping metric."""
    x_val, _ = datasets.digits("val")
    g = torch.Generator().manual_seed(1234)
    return torch.stack([elbo_fn(model, x_val, g).neg_elbo for _ in range(samples)]).mean().item()
