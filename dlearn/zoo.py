"""The registry of the weights the book ships: each with the recipe that trains it and the metrics it reaches.

    from dlearn import zoo
    clf = zoo.load("digits_classifier")      # an nn.Module in eval mode, gradients off
    zoo.info("digits_classifier")            # recipe, training seconds, metrics, versions

Retrain one (writes dlearn/weights/<name>.safetensors with its metrics), or re-measure what it records:

    python -m dlearn.zoo train digits_classifier
    python -m dlearn.zoo train text2image --checkpoint-dir runs/text2image   # rerun the same command to resume
    python -m dlearn.zoo train ddpm_x0 --add-seeds 1 2   # more seeds for the record, the shipped tensors kept
    python -m dlearn.zoo check vdm --full
    python -m dlearn.zoo list

Comparisons whose point is their numbers (ablations, other losses or schedules) ship their record only,
in dlearn/weights/records.json: recipe, seeds, metrics and history, without the weights.
`python -m dlearn.zoo train NAME --keep-weights` re-creates the weights, and `check NAME --full` retrains
every recorded seed to re-measure the numbers.

The recipes and metrics live in `dlearn.studies`; the registry imports them, and stands after them in
the package's layering, so no chapter module depends on it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dlearn import controlnet, diffusion, fileio, hvae, metrics, shipped, text2image, vae, vdm
from dlearn.studies import classifier as classifier_study
from dlearn.studies import controlnet as controlnet_study
from dlearn.studies import diffusion as diffusion_study
from dlearn.studies import dreambooth as dreambooth_study
from dlearn.studies import hvae as hvae_study
from dlearn.studies import text2image as text2image_study
from dlearn.studies import vae as vae_study
from dlearn.studies import vdm as vdm_study
from dlearn.train import WeightsFileError, load_safetensors, save_safetensors


@dataclass(frozen=True)
class Entry:
    """One shipped model.

    Args:
        build: returns the untrained nn.Module (called with `config`).
        recipe: (seed=..., **config, **recipe_kwargs) -> (trained model, TrainResult).
        evaluate: model -> {metric name: float}, the numbers recorded and re-checked.
        description: one line for `zoo list`.
        config: the architecture, passed to both `build` and `recipe`.
        recipe_kwargs: further settings of the recipe only.
        seeds: the seeds a full retrain (`train NAME`) runs, once each; the first seed's weights ship, and the
            record holds every seed's metrics with their mean and standard deviation. `add_seeds` can give the
            record more runs later without retraining the shipped seed, so a record's seeds are `seeds`
            followed by any added seeds in increasing order (`check` holds it to that).
        tolerance: how far a re-evaluation may move each metric (absolute) before the check fails.
        quick_evaluate: model -> a subset of the metrics, cheap enough for the test suite; `check` uses
            it unless asked for the full evaluation (None: `evaluate` is cheap).
        weights: True: the weights file ships (dlearn/weights/<name>.safetensors). False: a comparison whose
            point is its numbers: only its record ships (dlearn/weights/records.json: recipe, seeds, metrics,
            history); `train` re-creates the weights and `check --full` retrains to re-measure the numbers.
    """

    build: Callable[..., nn.Module]
    recipe: Callable
    evaluate: Callable[[nn.Module], dict]
    description: str
    config: dict = field(default_factory=dict)
    recipe_kwargs: dict = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    tolerance: float = 1e-6
    quick_evaluate: Callable[[nn.Module], dict] | None = None
    weights: bool = True


def _latent_model(kind: str, description: str, config: dict, recipe_kwargs: dict, seeds=(0,), weights: bool = True) -> Entry:
    """An entry of chapter 02 ("vae") or 03 ("hvae"): its model class, recipe and likelihood protocol."""
    build, recipe, evaluate = {
        "vae": (vae.ConvVAE, vae_study.train_vae, vae_study.protocol_metrics),
        "hvae": (hvae.HVAE, hvae_study.train_hvae, hvae_study.protocol_metrics),
    }[kind]
    return Entry(
        build=build,
        recipe=recipe,
        evaluate=evaluate,
        description=description,
        config=config,
        recipe_kwargs=recipe_kwargs,
        seeds=tuple(seeds),
        tolerance=0.05,  # nats: the metrics are Monte Carlo estimates with a fixed seed
        weights=weights,
    )


def _vdm_entry(description: str, learned: bool, parameterisation: str | None = None, seeds=(0, 1, 2),
               augment: bool = True, weights: bool = True) -> Entry:  # fmt: skip
    """An entry of chapter 04: the digits VDM (log-SNR from 10 at t = 0 to -6 at t = 1), 5000 steps, its test
    bound; trained with non-leaky augmentation (half of each batch) unless `augment` is False."""
    config = {"learned": learned, "logsnr_max": 10.0, "logsnr_min": -6.0, "channels": (32, 64), "augment": augment}
    if parameterisation is not None:
        config["parameterisation"] = parameterisation
    return Entry(
        build=vdm.build_vdm,
        recipe=vdm_study.train_vdm,
        evaluate=vdm_study.protocol_metrics,
        description=description,
        config=config,
        recipe_kwargs={"max_steps": 5000, **({"augment_p": 0.5} if augment else {})},
        seeds=tuple(seeds),
        tolerance=0.05,
        weights=weights,
    )


REGISTRY: dict[str, Entry] = {
    "digits_classifier": Entry(
        build=metrics.DigitClassifier,
        recipe=classifier_study.train_classifier,
        evaluate=classifier_study.classifier_metrics,
        description="small CNN on the digits (train split, best val accuracy): accuracy, FD features",
        tolerance=1e-4,
    ),
    "vae": _latent_model(
        "vae",
        "chapter 02's VAE: conv, 2x4x4 latent map, categorical pixels; likelihood protocol, 3 seeds",
        {"latent_channels": 2, "channels": (32, 64), "dropout": 0.0},
        {"max_steps": 4000},
        seeds=(0, 1, 2),
    ),
    "vae_warmup": _latent_model(
        "vae",
        "chapter 03's comparison: vae trained with hvae's KL warm-up (1000 steps), so the two share one schedule "
        "(the HVAE also has 8 more latent numbers and a learned prior)",
        {"latent_channels": 2, "channels": (32, 64), "dropout": 0.0},
        {"max_steps": 4000, "warmup_steps": 1000},
        seeds=(0, 1, 2),
        weights=False,
    ),
    **{
        f"vae_z{k}": _latent_model(
            "vae",
            f"chapter 02's VAE with a {k}-dimensional latent vector (study 02b: latent size, latent map)",
            {"latent_dim": k, "channels": (16, 32), "hidden": 128, "dropout": 0.1},
            {"max_steps": 4000},
        )
        for k in (2, 8, 16)
    },
    "hvae": _latent_model(
        "hvae",
        "chapter 03's two-level HVAE: top-down inference, KL warm-up; likelihood protocol, 3 seeds",
        {"z1_channels": 2, "z2_dim": 8, "inference": "top_down"},
        {"max_steps": 4000, "warmup_steps": 1000},
        seeds=(0, 1, 2),
    ),
    "hvae_markov": _latent_model(
        "hvae",
        "chapter 03's ablation: Luo's Markov encoder q(z1 | x) q(z2 | z1), otherwise as hvae",
        {"z1_channels": 2, "z2_dim": 8, "inference": "markov"},
        {"max_steps": 4000, "warmup_steps": 1000},
        weights=False,
    ),
    "vdm": _vdm_entry(
        "chapter 04's continuous-time VDM: 17-level denoiser, learned schedule, non-leaky augmentation; test bound, 3 seeds",
        True,
    ),
    "vdm_fixed": _vdm_entry(
        "chapter 04's comparison: vdm with a fixed linear log-SNR schedule (same endpoints); 3 seeds", False, weights=False
    ),
    "vdm_noaug": _vdm_entry(
        "chapter 04's comparison: vdm trained without augmentation; 3 seeds", True, augment=False, weights=False
    ),
    **{
        name: Entry(
            build=diffusion.build_ddpm,
            recipe=diffusion_study.train_ddpm,
            evaluate=diffusion_study.protocol_metrics,
            description=f"chapter 05's DDPM: conv denoiser, linear schedule, {desc}; FD, memorisation, bound",
            config={"prediction_type": pred, "channels": (32, 64), "dropout": 0.1},
            recipe_kwargs={"max_steps": 6000, "weighting": weighting},
            tolerance=0.05,
            quick_evaluate=diffusion_study.quick_metrics,
            weights=weights,
        )
        for name, pred, weighting, desc, weights in (
            ("ddpm", "eps", "simple", "eps-prediction, L_simple", True),
            ("ddpm_x0", "x0", "simple", "x0-prediction, unweighted MSE", True),
            ("ddpm_v", "v", "simple", "v-prediction, unweighted MSE", False),
            ("ddpm_vlb", "eps", "vlb", "eps-prediction trained on the bound L_vlb", False),
            ("ddpm_levels", "levels", "simple", "chapter 04's 17-level denoiser, x0 MSE", False),
            ("ddpm_levels_vlb", "levels", "vlb", "chapter 04's 17-level denoiser trained on the bound L_vlb", False),
        )
    },
    "ddpm_class": Entry(
        build=diffusion.build_ddpm,
        recipe=diffusion_study.train_ddpm,
        evaluate=diffusion_study.class_protocol_metrics,
        description="chapter 05's class-conditional DDPM (eps, L_simple), the unconditional DDPM's budget and rule (6000 "
        "steps, the best validation FD); sampled with the train split's class proportions: FD, memorisation, bound "
        "given the label; 3 seeds",
        config={"prediction_type": "eps", "channels": (32, 64), "dropout": 0.1, "num_classes": 10},
        recipe_kwargs={"max_steps": 6000, "eval_every": 1000},
        seeds=(0, 1, 2),
        tolerance=0.05,
        quick_evaluate=diffusion_study.quick_metrics,
    ),
    "vdm_eps": _vdm_entry(
        "chapter 04's comparison: vdm with plain eps-prediction instead of the 17-level denoiser",
        True,
        "eps",
        seeds=(0, 1, 2),
        weights=False,
    ),
    "text2image": Entry(
        build=text2image.TextToImage,
        recipe=text2image_study.train_text2image,
        evaluate=text2image_study.protocol_metrics,
        description="chapter 07's tiny text-to-image model: text encoder + UNet2DConditionModel, prompt dropout 0.1",
        recipe_kwargs={"max_steps": 5000},
        tolerance=0.05,
        quick_evaluate=text2image_study.quick_metrics,
    ),
    **{
        name: Entry(
            build=controlnet.ControlNet,
            recipe=controlnet_study.train_controlnet,
            evaluate=controlnet_study.protocol_metrics,
            description=description,
            config={"control": control},
            recipe_kwargs={"max_steps": steps},
            tolerance=0.02,
            quick_evaluate=controlnet_study.quick_metrics,
        )
        for name, control, steps, description in (
            ("controlnet", "mask", 1500, "chapter 08's ControlNet on the locked text2image base: control = the digit's mask"),
            ("controlnet_top", "top", 1000, "chapter 08's second and third ControlNets (C16): the top half of the mask"),
            ("controlnet_bottom", "bottom", 1000, "chapter 08's ControlNet for the bottom half of the mask (C16)"),
            ("controlnet_coarse", "coarse", 600, "chapter 08's ControlNet on a coarse 4x4 layout map (it must interpret it)"),
        )
    },
    "dreambooth": Entry(
        build=text2image.TextToImage,
        recipe=dreambooth_study.train_dreambooth,
        evaluate=dreambooth_study.protocol_metrics,
        description="chapter 09's DreamBooth: text2image fine-tuned on 5 images of one style of three, with prior preservation",
        recipe_kwargs={"max_steps": 300},
        tolerance=0.02,
    ),
    "hvae_no_warmup": _latent_model(
        "hvae",
        "chapter 03's ablation: hvae without KL warm-up",
        {"z1_channels": 2, "z2_dim": 8, "inference": "top_down"},
        {"max_steps": 4000},
    ),
}


def _entry(name: str) -> Entry:
    if name not in REGISTRY:
        raise KeyError(f"no model named {name!r} in the zoo; known: {sorted(REGISTRY)}")
    return REGISTRY[name]


def weights_path(name: str) -> Path:
    """Where the shipped weights of `name` live."""
    _entry(name)
    return shipped.path(name)


def info(name: str) -> dict:
    """The metadata recorded when `name` was trained: recipe, seeds, training seconds, metrics, versions
    (stored in its weights file, or in the records file for an entry that ships its record only)."""
    return shipped.info(name) if _entry(name).weights else shipped.record(name)


def build(name: str) -> nn.Module:
    """An untrained model of the entry's architecture."""
    entry = _entry(name)
    return entry.build(**entry.config)


def load(name: str, device: str | torch.device = "cpu") -> nn.Module:
    """The shipped model `name`, in eval mode with gradients switched off.

    An entry that ships its record only loads once `python -m dlearn.zoo train NAME --keep-weights` has
    written its weights file on this machine."""
    entry = _entry(name)
    if not entry.weights and not shipped.path(name).is_file():
        seconds = info(name).get("train_seconds", "?")
        raise WeightsFileError(
            f"{name} ships its record only (its numbers, in dlearn/weights/{shipped.RECORDS}), not its weights. "
            f"`python -m dlearn.zoo train {name} --keep-weights` retrains it (about {seconds} s per seed on one "
            "CPU thread) and writes them."
        )
    return shipped.load(build(name), name, device)


def evaluate(name: str, model: nn.Module) -> dict[str, float]:
    """Recompute the entry's metrics for `model`."""
    return {k: float(v) for k, v in _entry(name).evaluate(model).items()}


def check(name: str, full: bool = False) -> dict[str, tuple[float, float]]:
    """Re-evaluate the shipped weights; raise if any metric moved beyond the entry's tolerance.

    Args:
        full: re-measure every recorded metric, even where the entry has a cheaper `quick_evaluate`
            that re-measures a subset (the default, used by the test suite).

    Returns:
        {metric: (recorded, measured)} for the metrics re-measured.
    """
    entry = _entry(name)
    if not entry.weights:
        return _check_record(name, full)
    _check_summary(name, info(name))  # the runs, mean and std (which `add_seeds` rewrites) agree with each other
    measured = evaluate(name, load(name)) if full or entry.quick_evaluate is None else {
        k: float(v) for k, v in entry.quick_evaluate(load(name)).items()}  # fmt: skip
    recorded = {k: v for k, v in info(name)["metrics"].items() if k in measured or full or entry.quick_evaluate is None}
    tol = entry.tolerance
    report = {k: (recorded[k], measured.get(k, float("nan"))) for k in recorded}
    bad = {k: v for k, v in report.items() if not abs(v[0] - v[1]) <= tol}
    if bad:
        raise AssertionError(f"{name}: shipped weights no longer reach their recorded metrics (tolerance {tol}): {bad}")
    return report


def _summary(runs: list[dict]) -> tuple[dict, dict]:
    """Mean and (n - 1) standard deviation of each metric over the runs."""
    keys = runs[0]["metrics"]
    mean = {k: sum(r["metrics"][k] for r in runs) / len(runs) for k in keys}
    std = {k: (sum((r["metrics"][k] - mean[k]) ** 2 for r in runs) / max(1, len(runs) - 1)) ** 0.5 for k in keys}
    return mean, std


def _seeds_problem(name: str, seeds: list[int]) -> str | None:
    """Why a record's run seeds break the convention (None if they keep it): the entry's `seeds` (those a full
    retrain runs, the shipped or headline one first), then any seeds `add_seeds` added, increasing, none twice."""
    base = list(_entry(name).seeds)
    added = seeds[len(base) :]
    if seeds[: len(base)] != base or added != sorted(set(added)) or set(added) & set(base):
        return (f"the record holds seeds {seeds}; it should hold the entry's seeds {base} followed by any added "
                "seeds in increasing order (`python -m dlearn.zoo train NAME --add-seeds ...`)")  # fmt: skip
    return None


def _check_summary(name: str, rec: dict) -> dict[str, tuple[float, float]]:
    """The record's seeds keep the convention (`_seeds_problem`), and its mean and std are those of its runs;
    returns {"mean k" / "std k": (recorded, recomputed)}."""
    runs = rec["runs"]
    problem = _seeds_problem(name, [r["seed"] for r in runs])
    if problem:
        raise AssertionError(f"{name}: {problem}")
    mean, std = _summary(runs)
    report = {f"mean {k}": (rec["mean"][k], mean[k]) for k in mean} | {f"std {k}": (rec["std"][k], std[k]) for k in std}
    bad = {k: v for k, v in report.items() if not abs(v[0] - v[1]) <= 1e-9}
    if bad:
        raise AssertionError(f"{name}: the record no longer matches its runs (tolerance 1e-9): {bad}")
    return report


def _check_record(name: str, full: bool) -> dict[str, tuple[float, float]]:
    """An entry that ships its record only. Quick: the record agrees with itself (its seeds are the entry's,
    then any added ones; the first run is the headline; mean and std are those of the runs). Full: retrain
    every recorded seed, added ones included, and re-measure."""
    entry, rec = _entry(name), info(name)
    runs = rec["runs"]
    if runs[0]["metrics"] != rec["metrics"]:
        raise AssertionError(f"{name}: the record's headline metrics are not those of its first run")
    summary = _check_summary(name, rec)
    if not full:
        report, tol = summary, 1e-9
    else:
        report = {}
        for r in runs:
            _, meta = train(name, seed=r["seed"], save=False)
            report |= {f"seed {r['seed']} {k}": (v, meta["metrics"].get(k, float("nan"))) for k, v in r["metrics"].items()}
        tol = entry.tolerance
    bad = {k: v for k, v in report.items() if not abs(v[0] - v[1]) <= tol}
    if bad:
        raise AssertionError(f"{name}: the record no longer matches (tolerance {tol}): {bad}")
    return report


def train(name: str, seed: int | None = None, save: bool = True, measure: bool = True, keep_weights: bool = False,
          checkpoint_dir: str | Path | None = None, **overrides) -> tuple[nn.Module, dict]:  # fmt: skip
    """Run the entry's recipe once per seed (or for `seed` alone), measure each run, and (by default)
    write the first run's weights with the metadata of all runs; for an entry that ships its record
    only, write the record. `keep_weights` (for such an entry): train the first seed (or `seed`) and write
    its weights file only, so that `load` works on this machine; the shipped record stays as it is.

    A full retrain runs the entry's `seeds` only: seeds added to the record with `add_seeds` are not kept
    (add them again). To give a record more seeds without changing its shipped weights, use `add_seeds`.

    `checkpoint_dir`: each seed's run checkpoints in `checkpoint_dir/seed<N>/` (`train.fit`'s checkpoints and
    `recipe.json`, the entry and settings that wrote them), and the same call again resumes each run where it
    stopped, or takes a finished one as it is. Settings other than those in `recipe.json` are refused; delete
    the folder to train afresh. A resumed run's "train_seconds" include the earlier sessions' training.

    Returns:
        the first run's model and the metadata: its metrics and training time, and under "runs" every
        seed's metrics, with "mean" and "std" over the seeds.
    """
    entry = _entry(name)
    if keep_weights and entry.weights:
        raise ValueError(f"{name} ships its weights: `train` writes them; keep_weights is for record-only entries")
    if save and not entry.weights and not keep_weights and seed is not None:
        raise ValueError(f"the record of {name} holds every seed of the entry {entry.seeds}: train it without a seed "
                         "to rewrite the record, or with save=False")  # fmt: skip
    seeds = (entry.seeds[:1] if keep_weights else entry.seeds) if seed is None else (seed,)
    kwargs = {**entry.config, **entry.recipe_kwargs, **overrides}
    if save and not measure:
        raise ValueError("weights are saved only with their measured metrics (measure=True)")
    if checkpoint_dir is not None and "checkpoint_dir" not in inspect.signature(entry.recipe).parameters:
        raise ValueError(f"{name}'s recipe {entry.recipe.__module__}:{entry.recipe.__name__} does not checkpoint "
                         "(it is a short run): train it without a checkpoint folder")  # fmt: skip
    runs, models, histories = [], [], []
    for s in seeds:
        start = time.perf_counter()
        resume = {} if checkpoint_dir is None else {"checkpoint_dir": _run_folder(checkpoint_dir, name, s, kwargs)}
        model, result = entry.recipe(seed=s, **kwargs, **resume)
        seconds = round(time.perf_counter() - start + getattr(result, "resumed_seconds", 0.0), 1)
        runs.append({"seed": s, "steps": result.steps, "best_step": result.best_step, "best_val": result.best_metric,
                     "train_seconds": seconds, "metrics": evaluate(name, model) if measure else {}})  # fmt: skip
        models.append(model)
        histories.append(result.history)
    mean, std = _summary(runs)
    metadata = {
        "name": name,
        "recipe": f"{entry.recipe.__module__}:{entry.recipe.__name__}",
        "recipe_kwargs": kwargs,
        **{k: runs[0][k] for k in ("seed", "steps", "best_step", "best_val", "train_seconds", "metrics")},
        "history": histories[0],
        "runs": runs,
        "mean": mean,
        "std": std,
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    if keep_weights or save and entry.weights:
        save_safetensors(weights_path(name), models[0].state_dict(), metadata)
    elif save:
        shipped.save_record(name, metadata)
    return models[0], metadata


def add_seeds(name: str, seeds, checkpoint_dir: str | Path | None = None) -> dict:
    """Train and measure more seeds of the entry's recipe and merge them into its record, leaving what ships
    of the first seed as it is: a retrain of that seed on another machine would not give its tensors bit for
    bit, so `train NAME` (every seed again, the file rewritten) cannot grow a record whose weights ship.

    The record's "runs" gain the new seeds (after the entry's seeds, in increasing order; `check` holds
    records to that), "mean" and "std" are recomputed over all runs (`_summary`), "seeds" is updated where
    the record stores it, and the rest (the headline seed's metrics, history, best step, versions) stays.
    Each added run also records the torch threads and versions it was trained with. An entry whose weights
    ship gets its file rewritten with the same tensors (read and written back, the digest recomputed over
    them and the new metadata); a record-only entry gets its record in records.json rewritten.

    Args:
        seeds: the seeds to add; a seed the record already holds, or one given twice, is refused (ValueError).
        checkpoint_dir: as in `train`: each new seed's run checkpoints in `checkpoint_dir/seed<N>/`, and the
            same call again resumes it.

    Raises:
        ValueError: no seeds, a seed already recorded, a record trained with other settings than the
            entry's (retrain it with `train NAME` instead), a record that does not keep the seed convention,
            or new runs that measure other metrics than the recorded ones.

    Returns:
        the new metadata.
    """
    entry = _entry(name)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("add_seeds needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds given more than once: {sorted({s for s in seeds if seeds.count(s) > 1})}")
    if entry.weights:
        file = weights_path(name)
        tensors, rec = load_safetensors(file, hint=shipped.hint(name), require_digest=True)
    else:
        rec = shipped.record(name)
    have = [r["seed"] for r in rec["runs"]]
    already = sorted(set(seeds) & set(have))
    if already:
        raise ValueError(f"the record of {name} already holds seeds {already} (it holds {have}): add other seeds")
    problem = _seeds_problem(name, have)
    if problem:
        raise ValueError(f"{name}: {problem}; retrain it with `python -m dlearn.zoo train {name}` instead")
    recipe = f"{entry.recipe.__module__}:{entry.recipe.__name__}"

    def settings(kwargs):
        return {k: v for k, v in json.loads(json.dumps(kwargs, sort_keys=True)).items() if k != "progress"}

    if rec.get("recipe") != recipe or settings(rec.get("recipe_kwargs", {})) != settings({**entry.config, **entry.recipe_kwargs}):
        raise ValueError(f"the record of {name} was trained with {rec.get('recipe')} {rec.get('recipe_kwargs')}, the entry "
                         f"now trains {recipe} {settings({**entry.config, **entry.recipe_kwargs})}: its runs would not be "
                         f"seeds of one recipe; retrain it with `python -m dlearn.zoo train {name}`")  # fmt: skip
    keys = set(rec["runs"][0]["metrics"])
    new = []
    for s in sorted(seeds):
        _, meta = train(name, seed=s, save=False, checkpoint_dir=checkpoint_dir)
        run = meta["runs"][0]
        if set(run["metrics"]) != keys:
            raise ValueError(f"seed {s} of {name} measures {sorted(run['metrics'])}, the record {sorted(keys)}: the "
                             f"entry's evaluate changed; retrain it with `python -m dlearn.zoo train {name}`")  # fmt: skip
        new.append({**run, "torch_threads": meta["torch_threads"], "versions": meta["versions"]})
    order = {s: i for i, s in enumerate(entry.seeds)}
    runs = sorted([*rec["runs"], *new], key=lambda r: (0, order[r["seed"]]) if r["seed"] in order else (1, r["seed"]))
    mean, std = _summary(runs)
    metadata = {**rec, "runs": runs, "mean": mean, "std": std}
    if "seeds" in rec:
        metadata["seeds"] = [r["seed"] for r in runs]
    if entry.weights:
        save_safetensors(file, tensors, metadata)
    else:
        shipped.save_record(name, metadata)
    return metadata


def _run_folder(checkpoint_dir: str | Path, name: str, seed: int, kwargs: dict) -> Path:
    """`checkpoint_dir/seed<N>`, holding `recipe.json` (the entry and settings of its checkpoints); refuses a folder
    whose checkpoints another entry or other settings wrote (all but "progress", which does not change the run)."""
    folder = Path(checkpoint_dir) / f"seed{seed}"
    entry = _entry(name)
    settings = {k: v for k, v in kwargs.items() if k != "progress"}
    wrote = json.loads(json.dumps({"name": name, "recipe": f"{entry.recipe.__module__}:{entry.recipe.__name__}",
                                   "seed": seed, "settings": settings}, sort_keys=True, default=repr))  # fmt: skip
    record = folder / "recipe.json"
    if record.is_file():
        try:
            found = json.loads(record.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{record} is unreadable ({exc}): delete {folder} to train afresh") from exc
        if found != wrote:
            raise ValueError(f"the checkpoints in {folder} were written by another run ({found}), not by {wrote}: "
                             f"use another checkpoint folder or delete {folder} to train afresh")  # fmt: skip
    else:
        fileio.write_text(record, json.dumps(wrote, indent=1, sort_keys=True) + "\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dlearn.zoo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the shipped models and their recorded metrics")
    p_train = sub.add_parser("train", help="run a recipe and write the weights")
    p_train.add_argument("name")
    p_train.add_argument("--seed", type=int, default=None, help="one seed instead of the entry's seeds")
    p_train.add_argument(
        "--keep-weights", action="store_true", help="also write the weights of an entry that ships its record only"
    )
    p_train.add_argument(
        "--add-seeds", metavar="SEED", type=int, nargs="+", default=None,
        help="train only these new seeds and add them to the record (runs, mean, std); the shipped weights stay",
    )  # fmt: skip
    p_train.add_argument(
        "--checkpoint-dir", metavar="DIR", default=None,
        help="checkpoint each seed's run in DIR/seed<N>/; the same command again resumes where it stopped "
        "(delete DIR to train afresh)",
    )  # fmt: skip
    p_check = sub.add_parser("check", help="re-evaluate shipped weights against their recorded metrics")
    p_check.add_argument("names", nargs="+", metavar="name", help="entries to check, or `all`")
    p_check.add_argument("--full", action="store_true", help="re-measure every metric (slow for the DDPMs; retrains records)")
    p_check.add_argument("--shipped", action="store_true", help="with `all`: only the entries whose weights ship")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, entry in REGISTRY.items():
            try:
                meta = info(name)
                status = "" if entry.weights else "record only, "
                status += f"{meta['train_seconds']} s, " + ", ".join(f"{k} {v:.4g}" for k, v in meta["metrics"].items())
            except WeightsFileError as exc:
                status = f"not available: {exc}"
            print(f"{name}: {entry.description}\n    {status}")
    elif args.command == "train" and args.add_seeds is not None:
        if args.seed is not None or args.keep_weights:
            parser.error("--add-seeds goes without --seed and --keep-weights")
        meta = add_seeds(args.name, args.add_seeds, checkpoint_dir=args.checkpoint_dir)
        where = weights_path(args.name) if _entry(args.name).weights else shipped.WEIGHTS_DIR / shipped.RECORDS
        print(f"wrote {where}: seeds {[r['seed'] for r in meta['runs']]}, mean {meta['mean']}, std {meta['std']}")
    elif args.command == "train":
        _, meta = train(args.name, seed=args.seed, keep_weights=args.keep_weights, checkpoint_dir=args.checkpoint_dir)
        keeps_weights = _entry(args.name).weights or args.keep_weights
        where = weights_path(args.name) if keeps_weights else shipped.WEIGHTS_DIR / shipped.RECORDS
        print(f"wrote {where}: {meta['train_seconds']} s, metrics {meta['metrics']}")
    else:
        if args.shipped and args.names != ["all"]:
            parser.error("--shipped goes with `all`")
        names = [n for n, e in REGISTRY.items() if e.weights or not args.shipped] if args.names == ["all"] else args.names
        failed = []
        for name in names:
            start = time.perf_counter()
            try:
                report = check(name, full=args.full)
            except AssertionError as exc:
                failed.append(name)
                print(f"{name}: FAILED: {exc}", flush=True)
                continue
            print(f"{name}: ok ({time.perf_counter() - start:.0f} s)", flush=True)
            for k, (rec, got) in report.items():
                print(f"    {k}: recorded {rec:.6g}, measured {got:.6g}", flush=True)
        if failed:
            raise SystemExit(f"{len(failed)} of {len(names)} entries no longer reach their records: {failed}")


if __name__ == "__main__":
    main()
