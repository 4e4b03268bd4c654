"""The small weights the book ships: each with the recipe that trains it and the metrics it reaches.

    from dlearn import zoo
    clf = zoo.load("digits_classifier")      # an nn.Module in eval mode, gradients off
    zoo.info("digits_classifier")            # recipe, training seconds, metrics, versions

Retrain one (writes dlearn/weights/<name>.safetensors with its metrics):

    python -m dlearn.zoo train digits_classifier
    python -m dlearn.zoo list

The registry names functions as "module:attribute" strings, imported only when used, so that the
zoo can list later chapters' models without importing them (and `import dlearn` stays light).
"""

from __future__ import annotations

import argparse
import importlib
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dlearn.train import WeightsFileError, load_safetensors, load_state_into, save_safetensors

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class Entry:
    """One shipped model.

    Args:
        build: "module:callable" returning the untrained nn.Module (called with `config`).
        recipe: "module:callable" (seed=..., **config, **recipe_kwargs) -> (trained model, TrainResult).
        evaluate: "module:callable" model -> {metric name: float}, the numbers recorded and re-checked.
        description: one line for `zoo list`.
        config: the architecture, passed to both `build` and `recipe`.
        recipe_kwargs: further settings of the recipe only.
        seeds: the recipe runs once per seed; the first seed's weights ship, and the record holds every
            seed's metrics with their mean and standard deviation.
        tolerance: how far a re-evaluation may move each metric (absolute) before the check fails.
        quick_evaluate: "module:callable" model -> a subset of the metrics, cheap enough for the test
            suite; `check` uses it unless asked for the full evaluation (None: `evaluate` is cheap).
    """

    build: str
    recipe: str
    evaluate: str
    description: str
    config: dict = field(default_factory=dict)
    recipe_kwargs: dict = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    tolerance: float = 1e-6
    quick_evaluate: str | None = None


def _latent_model(module: str, description: str, config: dict, recipe_kwargs: dict, seeds=(0,)) -> Entry:
    """An entry of chapter 02 ("vae") or 03 ("hvae"): its model class, recipe and likelihood protocol."""
    model_class = {"vae": "ConvVAE", "hvae": "HVAE"}[module]
    return Entry(
        build=f"dlearn.{module}:{model_class}",
        recipe=f"dlearn.{module}:train_{module}",
        evaluate=f"dlearn.{module}:protocol_metrics",
        description=description,
        config=config,
        recipe_kwargs=recipe_kwargs,
        seeds=tuple(seeds),
        tolerance=0.05,  # nats: the metrics are Monte Carlo estimates with a fixed seed
    )


def _vdm_entry(description: str, learned: bool, parameterisation: str | None = None, seeds=(0, 1, 2),
               augment: bool = True) -> Entry:  # fmt: skip
    """An entry of chapter 04: the digits VDM (log-SNR from -10 to 6), 5000 steps, its test bound; trained
    with non-leaky augmentation (half of each batch) unless `augment` is False."""
    config = {"learned": learned, "gamma_min": -10.0, "gamma_max": 6.0, "channels": (32, 64), "augment": augment}
    if parameterisation is not None:
        config["parameterisation"] = parameterisation
    return Entry(
        build="dlearn.vdm:build_vdm",
        recipe="dlearn.vdm:train_vdm",
        evaluate="dlearn.vdm:protocol_metrics",
        description=description,
        config=config,
        recipe_kwargs={"max_steps": 5000, **({"augment_p": 0.5} if augment else {})},
        seeds=tuple(seeds),
        tolerance=0.05,
    )


REGISTRY: dict[str, Entry] = {
    "digits_classifier": Entry(
        build="dlearn.metrics:DigitClassifier",
        recipe="dlearn.metrics:train_classifier",
        evaluate="dlearn.metrics:classifier_metrics",
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
    **{
        f"vae_z{k}": _latent_model(
            "vae",
            f"chapter 02's VAE with a {k}-dimensional latent vector (latent size study, latent map)",
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
    ),
    "vdm": _vdm_entry(
        "chapter 04's continuous-time VDM: 17-level denoiser, learned schedule, non-leaky augmentation; test bound, 3 seeds",
        True,
    ),
    "vdm_fixed": _vdm_entry("chapter 04's comparison: vdm with a fixed linear log-SNR schedule (same endpoints); 3 seeds", False),
    "vdm_noaug": _vdm_entry("chapter 04's comparison: vdm trained without augmentation; 3 seeds", True, augment=False),
    **{
        name: Entry(
            build="dlearn.diffusion:build_ddpm",
            recipe="dlearn.diffusion:train_ddpm",
            evaluate="dlearn.diffusion:protocol_metrics",
            description=f"chapter 05's DDPM: conv denoiser, linear schedule, {desc}; FD, memorisation, bound",
            config={"prediction_type": pred, "channels": (32, 64), "dropout": 0.1},
            recipe_kwargs={"max_steps": 6000, "weighting": weighting},
            tolerance=0.05,
            quick_evaluate="dlearn.diffusion:quick_metrics",
        )
        for name, pred, weighting, desc in (
            ("ddpm", "eps", "simple", "eps-prediction, L_simple"),
            ("ddpm_x0", "x0", "simple", "x0-prediction, unweighted MSE"),
            ("ddpm_v", "v", "simple", "v-prediction, unweighted MSE"),
            ("ddpm_vlb", "eps", "vlb", "eps-prediction trained on the bound L_vlb"),
            ("ddpm_levels", "levels", "simple", "chapter 04's 17-level denoiser, x0 MSE"),
            ("ddpm_levels_vlb", "levels", "vlb", "chapter 04's 17-level denoiser trained on the bound L_vlb"),
        )
    },
    "ddpm_class": Entry(
        build="dlearn.diffusion:build_ddpm",
        recipe="dlearn.diffusion:train_ddpm",
        evaluate="dlearn.diffusion:class_protocol_metrics",
        description="chapter 05's class-conditional DDPM (eps, L_simple), 3000 steps; sampled with the train "
        "split's class proportions: FD, memorisation, bound given the label; 3 seeds",
        config={"prediction_type": "eps", "channels": (32, 64), "dropout": 0.1, "num_classes": 10},
        recipe_kwargs={"max_steps": 3000, "eval_every": 500},
        seeds=(0, 1, 2),
        tolerance=0.05,
        quick_evaluate="dlearn.diffusion:quick_metrics",
    ),
    "vdm_eps": _vdm_entry(
        "chapter 04's comparison: vdm with plain eps-prediction instead of the 17-level denoiser", True, "eps", seeds=(0,)
    ),
    "text2image": Entry(
        build="dlearn.text2image:TextToImage",
        recipe="dlearn.text2image:train_text2image",
        evaluate="dlearn.text2image:protocol_metrics",
        description="chapter 07's tiny text-to-image model: text encoder + UNet2DConditionModel, prompt dropout 0.1",
        recipe_kwargs={"max_steps": 5000},
        tolerance=0.05,
        quick_evaluate="dlearn.text2image:quick_metrics",
    ),
    **{
        name: Entry(
            build="dlearn.controlnet:ControlNet",
            recipe="dlearn.controlnet:train_controlnet",
            evaluate="dlearn.controlnet:protocol_metrics",
            description=description,
            config={"control": control},
            recipe_kwargs={"max_steps": steps},
            tolerance=0.02,
            quick_evaluate="dlearn.controlnet:quick_metrics",
        )
        for name, control, steps, description in (
            ("controlnet", "mask", 1500, "chapter 08's ControlNet on the locked text2image base: control = the digit's mask"),
            ("controlnet_top", "top", 1000, "chapter 08's second and third ControlNets (C16): the top half of the mask"),
            ("controlnet_bottom", "bottom", 1000, "chapter 08's ControlNet for the bottom half of the mask (C16)"),
        )
    },
    "dreambooth": Entry(
        build="dlearn.text2image:TextToImage",
        recipe="dlearn.dreambooth:train_dreambooth",
        evaluate="dlearn.dreambooth:protocol_metrics",
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


def _resolve(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _entry(name: str) -> Entry:
    if name not in REGISTRY:
        raise KeyError(f"no model named {name!r} in the zoo; known: {sorted(REGISTRY)}")
    return REGISTRY[name]


def weights_path(name: str) -> Path:
    """Where the shipped weights of `name` live."""
    _entry(name)
    return WEIGHTS_DIR / f"{name}.safetensors"


def _hint(name: str) -> str:
    return f"Recreate it with `python -m dlearn.zoo train {name}` (or restore it with `git checkout -- dlearn/weights`)."


def info(name: str) -> dict:
    """The metadata stored with the weights: recipe, seed, training seconds, metrics, versions."""
    return load_safetensors(weights_path(name), hint=_hint(name))[1]


def build(name: str) -> nn.Module:
    """An untrained model of the entry's architecture."""
    entry = _entry(name)
    return _resolve(entry.build)(**entry.config)


def load(name: str, device: str | torch.device = "cpu") -> nn.Module:
    """The shipped model `name`, in eval mode with gradients switched off."""
    path = weights_path(name)
    tensors, _ = load_safetensors(path, hint=_hint(name))
    model = build(name)
    load_state_into(model, tensors, path)
    return model.to(device).eval().requires_grad_(False)


def evaluate(name: str, model: nn.Module) -> dict[str, float]:
    """Recompute the entry's metrics for `model`."""
    return {k: float(v) for k, v in _resolve(_entry(name).evaluate)(model).items()}


def check(name: str, full: bool = False) -> dict[str, tuple[float, float]]:
    """Re-evaluate the shipped weights; raise if any metric moved beyond the entry's tolerance.

    Args:
        full: re-measure every recorded metric, even where the entry has a cheaper `quick_evaluate`
            that re-measures a subset (the default, used by the test suite).

    Returns:
        {metric: (recorded, measured)} for the metrics re-measured.
    """
    entry = _entry(name)
    measured = evaluate(name, load(name)) if full or entry.quick_evaluate is None else {
        k: float(v) for k, v in _resolve(entry.quick_evaluate)(load(name)).items()}  # fmt: skip
    recorded = {k: v for k, v in info(name)["metrics"].items() if k in measured or full or entry.quick_evaluate is None}
    tol = entry.tolerance
    report = {k: (recorded[k], measured.get(k, float("nan"))) for k in recorded}
    bad = {k: v for k, v in report.items() if not abs(v[0] - v[1]) <= tol}
    if bad:
        raise AssertionError(f"{name}: shipped weights no longer reach their recorded metrics (tolerance {tol}): {bad}")
    return report


def train(name: str, seed: int | None = None, save: bool = True, measure: bool = True, **overrides) -> tuple[nn.Module, dict]:
    """Run the entry's recipe once per seed (or for `seed` alone), measure each run, and (by default)
    write the first run's weights with the metadata of all runs.

    Returns:
        the first run's model and the metadata: its metrics and training time, and under "runs" every
        seed's metrics, with "mean" and "std" over the seeds.
    """
    entry = _entry(name)
    seeds = entry.seeds if seed is None else (seed,)
    kwargs = {**entry.config, **entry.recipe_kwargs, **overrides}
    if save and not measure:
        raise ValueError("weights are saved only with their measured metrics (measure=True)")
    runs, models, histories = [], [], []
    for s in seeds:
        start = time.perf_counter()
        model, result = _resolve(entry.recipe)(seed=s, **kwargs)
        seconds = round(time.perf_counter() - start, 1)
        runs.append({"seed": s, "steps": result.steps, "best_step": result.best_step, "best_val": result.best_metric,
                     "train_seconds": seconds, "metrics": evaluate(name, model) if measure else {}})  # fmt: skip
        models.append(model)
        histories.append(result.history)
    keys = runs[0]["metrics"]
    mean = {k: sum(r["metrics"][k] for r in runs) / len(runs) for k in keys}
    std = {k: (sum((r["metrics"][k] - mean[k]) ** 2 for r in runs) / max(1, len(runs) - 1)) ** 0.5 for k in keys}
    metadata = {
        "name": name,
        "recipe": entry.recipe,
        "recipe_kwargs": kwargs,
        **{k: runs[0][k] for k in ("seed", "steps", "best_step", "best_val", "train_seconds", "metrics")},
        "history": histories[0],
        "runs": runs,
        "mean": mean,
        "std": std,
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    if save:
        save_safetensors(weights_path(name), models[0].state_dict(), metadata)
    return models[0], metadata


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dlearn.zoo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the shipped models and their recorded metrics")
    p_train = sub.add_parser("train", help="run a recipe and write the weights")
    p_train.add_argument("name")
    p_train.add_argument("--seed", type=int, default=None, help="one seed instead of the entry's seeds")
    p_check = sub.add_parser("check", help="re-evaluate shipped weights against their recorded metrics")
    p_check.add_argument("name")
    p_check.add_argument("--full", action="store_true", help="re-measure every metric (slow for the DDPMs)")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, entry in REGISTRY.items():
            try:
                meta = info(name)
                status = f"{meta['train_seconds']} s, " + ", ".join(f"{k} {v:.4g}" for k, v in meta["metrics"].items())
            except WeightsFileError as exc:
                status = f"not available: {exc}"
            print(f"{name}: {entry.description}\n    {status}")
    elif args.command == "train":
        _, meta = train(args.name, seed=args.seed)
        print(f"wrote {weights_path(args.name)}: {meta['train_seconds']} s, metrics {meta['metrics']}")
    else:
        for k, (rec, got) in check(args.name, full=args.full).items():
            print(f"{k}: recorded {rec:.6g}, measured {got:.6g}")


if __name__ == "__main__":
    main()
