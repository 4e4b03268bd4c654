"""Chapter 07's recipe and measurements: `train_text2image` trains the shipped "text2image" model, and
`protocol_metrics` is what its file records: prompt fidelity, FD and memorisation at the guidance scales
`GUIDANCE_SCALES` (`quick_metrics`, the w = 2 part, is what the test suite re-measures).

    python -m dlearn.zoo train text2image     # runs `train_text2image`, records `protocol_metrics`
"""

from __future__ import annotations

from pathlib import Path

import torch

from dlearn import datasets, metrics, shipped
from dlearn.distributions import levels_to_unit, unit_to_levels
from dlearn.text2image import (
    TextToImage,
    attribute_bits,
    caption,
    evaluation_prompts,
    generate,
    noised,
    prompt_fidelity,
    tokenize,
    training_prompts,
)
from dlearn.train import TrainConfig, fit


def shipped_base() -> TextToImage:
    """The shipped text-to-image model ("text2image") that chapters 08-10 build on, in eval mode, gradients off."""
    return shipped.load(TextToImage(), "text2image")


def train_text2image(seed: int = 0, max_steps: int = 5000, p_uncond: float = 0.1, lr: float = 1e-3, batch_size: int = 64,
                     eval_every: int = 1000, progress: bool | None = None, checkpoint_dir: str | Path | None = None):  # fmt: skip
    """The zoo's recipe: eps-loss with random partial captions and prompt dropout `p_uncond`, AdamW, cosine decay,
    EMA 0.999; keeps the weights with the best validation FD (400 samples of validation captions, w = 2, DDIM-20).

    `checkpoint_dir`: `fit` checkpoints there, and the same call again resumes the run (`TrainConfig`)."""
    x, y = datasets.digits("train")
    data = (levels_to_unit(x), y, attribute_bits(x, y))
    x_val, y_val = datasets.digits("val")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TextToImage()
    clf = metrics.shipped_classifier()

    def loss_fn(m, batch, gen):
        x0, labels, bits = batch
        ids = tokenize(training_prompts(labels, bits, gen, p_uncond=p_uncond)).to(x0.device)
        x_t, t, eps = noised(x0, m.alpha_bar, gen)
        return ((m(x_t, t, ids) - eps) ** 2).mean()

    val_prompts = caption(x_val, y_val)  # every attribute of every validation digit
    val_feats = metrics.features(clf, levels_to_unit(x_val))

    def val_fn(m):
        imgs = generate(m, val_prompts, 2.0, steps=20, seed=1)
        return metrics.frechet_distance(metrics.features(clf, levels_to_unit(unit_to_levels(imgs.cpu()))), val_feats)

    cfg = TrainConfig(max_steps=max_steps, batch_size=batch_size, lr=lr, lr_schedule="cosine", ema=0.999,
                      eval_every=eval_every, seed=seed, progress=progress, checkpoint_dir=checkpoint_dir)  # fmt: skip
    result = fit(model, loss_fn, data, cfg, val_fn=val_fn)
    return model.eval(), result


GUIDANCE_SCALES = (1.0, 2.0, 4.0)


def protocol_metrics(model: TextToImage) -> dict[str, float]:
    """Prompt fidelity, FD and memorisation of 960 images (80 prompts x 12) at guidance scales 1, 2 and 4 (DDIM-50)."""
    prompts, classes, bits = evaluation_prompts()
    out = {}
    for w in GUIDANCE_SCALES:
        for k, v in prompt_fidelity(generate(model, prompts, w, steps=50, seed=0), classes, bits).items():
            out[f"{k}_w{w:g}"] = v
    return out


def quick_metrics(model: TextToImage) -> dict[str, float]:
    """The w = 2 part of `protocol_metrics` (the test suite re-measures this)."""
    prompts, classes, bits = evaluation_prompts()
    return {f"{k}_w2": v for k, v in prompt_fidelity(generate(model, prompts, 2.0, steps=50, seed=0), classes, bits).items()}
