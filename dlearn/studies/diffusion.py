"""Chapter 05's measurements: the scores of the digits DDPM's samples, the recipe of the shipped DDPMs
and the metrics recorded with them.

    python -m dlearn.zoo train ddpm     # runs `train_ddpm`, records `protocol_metrics`

`sample_quality` is the Frechet distance (in the shipped digits classifier's features) of samples to a
split, with the memorisation share; `quality_over_seeds` averages it over sampling seeds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dlearn import datasets, metrics
from dlearn.diffusion import DigitsDDPM, build_ddpm, generate, training_loss, vlb_terms
from dlearn.distributions import levels_to_unit, nats_to_bits_per_dim, unit_to_levels
from dlearn.train import TrainConfig, fit


def sample_quality(samples: torch.Tensor, reference: str = "test", classifier=None) -> dict[str, float]:
    """Frechet distance of samples (quantised to the 17 levels) to a split in the digits classifier's
    features, and the memorisation share (`metrics.memorisation`) against the train split."""
    clf = classifier if classifier is not None else metrics.shipped_classifier()
    x = levels_to_unit(unit_to_levels(samples.detach().cpu()))
    ref, _ = datasets.digits(reference, form="unit")
    train, _ = datasets.digits("train", form="unit")
    test, _ = datasets.digits("test", form="unit")
    return {
        "fd": metrics.frechet_distance(metrics.features(clf, x), metrics.features(clf, ref)),
        "memorisation": metrics.memorisation(x, train, test),
    }


def quality_over_seeds(model: DigitsDDPM, sampler: str = "ddim", steps: int = 50, seeds=(0, 1, 2), n: int = 1000,
                       classifier=None, labels: str = "stratified") -> dict[str, float]:  # fmt: skip
    """`sample_quality` of n samples for each sampling seed, with the mean and standard deviation over seeds.

    The Frechet distance of 1000 samples moves by a few tenths from one sampling seed to the next (the
    447 test digits stay fixed): compare models and samplers on the mean over seeds, not on one draw.

    `labels`, for a class-conditional model: "stratified" (the train split's class counts exactly,
    `generate`'s default) or "iid" (each label drawn independently with the train split's frequencies,
    so the class counts vary from seed to seed as an unconditional model's do).

    Returns:
        "fd_mean", "fd_std", "memorisation_mean", "memorisation_std", the per-seed "fd" and "memorisation"
        lists, and per seed the "class_counts": how many samples the classifier reads as each digit 0..9.
    """
    seeds = tuple(seeds)
    if not seeds:
        raise ValueError("seeds must name at least one sampling seed")
    if labels not in ("stratified", "iid"):
        raise ValueError(f"labels must be 'stratified' or 'iid', got {labels!r}")
    if labels == "iid" and model.num_classes is None:
        raise ValueError("labels='iid' needs a class-conditional model; this DDPM is unconditional")
    clf = classifier if classifier is not None else metrics.shipped_classifier()

    def draw(s):
        if labels == "stratified":
            return generate(model, n, sampler, steps, seed=s, progress=False)
        _, y_train = datasets.digits("train")
        freq = torch.bincount(y_train, minlength=model.num_classes).double()
        lab = torch.multinomial(freq, n, replacement=True, generator=torch.Generator().manual_seed(s))
        return generate(model, n, sampler, steps, seed=s, progress=False, labels=lab)

    runs, counts = [], []
    for s in seeds:
        x = draw(s)
        runs.append(sample_quality(x, "test", clf))
        classes = metrics.predict(clf, levels_to_unit(unit_to_levels(x.detach().cpu()))).argmax(1)
        counts.append(torch.bincount(classes, minlength=10).tolist())
    out: dict = {"class_counts": counts}
    for key in ("fd", "memorisation"):
        values = torch.tensor([r[key] for r in runs], dtype=torch.float64)
        out[key] = values.tolist()
        out[f"{key}_mean"] = values.mean().item()
        out[f"{key}_std"] = values.std().item() if len(seeds) > 1 else 0.0
    return out


def train_ddpm(
    seed: int = 0,
    max_steps: int = 6000,
    prediction_type: str = "eps",
    weighting: str = "simple",
    schedule: str = "linear",
    channels=(32, 64),
    dropout: float = 0.1,
    lr: float = 2e-3,
    eval_every: int = 1000,
    augment: bool = False,
    augment_p: float = 0.5,
    num_classes: int | None = None,
    progress: bool | None = None,
    checkpoint_dir: str | Path | None = None,
):
    """A recipe for the digits DDPM: AdamW, cosine decay, weight average (EMA 0.999), batch 128.

    Every `eval_every` steps it measures, on the validation split, the Frechet distance of 500 DDIM-20
    samples (the selection metric: the best-FD weights are returned), their memorisation (threshold from
    the validation digits) and the bound (stride 10); the history keeps them as "val",
    "val_memorisation" and "val_bound", to show that they need not agree.

    `augment`: train on `datasets.augment_digits` (a share `augment_p` of each batch transformed, the
    labels given to the denoiser); samples and bounds are always of the untransformed digits.

    `num_classes` (10): a class-conditional DDPM trained on (digit, label) pairs. Its validation samples
    have labels in the train split's proportions (`generate`) and its "val_bound" is the bound on
    -log p(x | label) with the validation labels.

    `checkpoint_dir`: `fit` checkpoints there, and the same call again resumes the run (`TrainConfig`).
    """
    x_train, y_train = datasets.digits("train", form="unit")
    x_val, y_val = datasets.digits("val")
    if num_classes is not None and num_classes != 10:
        raise ValueError(f"the digits have 10 classes: num_classes must be None or 10, got {num_classes!r}")
    conditional = num_classes is not None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_ddpm(prediction_type, schedule, channels, dropout, augment, num_classes)
    clf = metrics.shipped_classifier()
    x_val_unit = levels_to_unit(x_val)

    def val_fn(m):
        """The validation FD of 500 DDIM-20 samples selects the checkpoint; the bound and memorisation are logged."""
        g = torch.Generator().manual_seed(1)
        samples = generate(m, 500, "ddim", 20, seed=1, progress=False)
        return {
            "val_bound": vlb_terms(m, x_val, g, stride=10, labels=y_val if conditional else None).neg_elbo.mean().item(),
            "val_memorisation": metrics.memorisation(levels_to_unit(unit_to_levels(samples.cpu())), x_train, x_val_unit),
            "fd": sample_quality(samples, "val", clf)["fd"],
        }  # fmt: skip

    def loss_fn(m, batch, gen):
        classes = batch[1] if conditional else None
        if not augment:
            return training_loss(m, batch[0], gen, weighting, labels=classes)
        x, labels = datasets.augment_digits(batch[0], augment_p, gen)
        return training_loss(m, x, gen, weighting, aug=labels, labels=classes)

    cfg = TrainConfig(max_steps=max_steps, batch_size=128, lr=lr, lr_schedule="cosine", ema=0.999,
                      eval_every=eval_every, seed=seed, select="fd", progress=progress,
                      checkpoint_dir=checkpoint_dir)  # fmt: skip
    result = fit(model, loss_fn, (x_train, y_train) if conditional else (x_train,), cfg, val_fn=val_fn)
    return model.eval(), result


def protocol_metrics(model: DigitsDDPM) -> dict[str, float]:
    """The zoo's record: the test bound (nats, bits/dim; every step, one noise draw per image and step) and,
    for 1000 samples of each sampler (ancestral T = 1000; DDIM 50), the Frechet distance to the test
    split and the memorisation share.

    For a class-conditional model the bound is on -log p(x | label) with the test labels, recorded as
    "neg_elbo_given_label" (and "_bpd"), and the samples have labels in the train split's proportions."""
    x_test, y_test = datasets.digits("test")
    conditional = model.num_classes is not None
    labels = y_test if conditional else None
    nats = vlb_terms(model, x_test, torch.Generator().manual_seed(2), labels=labels).neg_elbo.mean().item()
    key = "neg_elbo_given_label" if conditional else "neg_elbo"
    out = {key: nats, f"{key}_bpd": nats_to_bits_per_dim(nats, 64)}
    q = sample_quality(generate(model, 1000, "ancestral", model.num_steps, seed=0, progress=False), "test")
    out["fd_ancestral"], out["memorisation_ancestral"] = q["fd"], q["memorisation"]
    return {**out, **quick_metrics(model)}


def class_protocol_metrics(model: DigitsDDPM) -> dict[str, float]:
    """The zoo's record for the class-conditional DDPM: `protocol_metrics` (its bound given the label), and
    the mean and SD over sampling seeds 0-2 of DDIM-20 (the sampler the recipe validates with), with
    stratified and with independently drawn labels."""
    out = protocol_metrics(model)
    for labels, suffix in (("stratified", ""), ("iid", "_iid")):
        r = quality_over_seeds(model, "ddim", 20, seeds=(0, 1, 2), labels=labels)
        for key in ("fd_mean", "fd_std", "memorisation_mean"):
            out[f"ddim20{suffix}_{key}"] = r[key]
    return out


def quick_metrics(model: DigitsDDPM) -> dict[str, float]:
    """The part of `protocol_metrics` that takes seconds: FD and memorisation of 1000 DDIM-50 samples."""
    q = sample_quality(generate(model, 1000, "ddim", 50, seed=0, progress=False), "test")
    return {"fd_ddim50": q["fd"], "memorisation_ddim50": q["memorisation"]}
