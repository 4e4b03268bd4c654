"""Where the book's shipped weights live, and how one file is read into a model.

    from dlearn import shipped, text2image
    base = shipped.load(text2image.TextToImage(), "text2image")   # eval mode, gradients off
    shipped.info("text2image")["metrics"]                           # what the file records

This is the file layer only: which recipe trains each file, and how its metrics are re-measured,
is the registry's business (`dlearn.zoo`), which stands after the studies in the package's layering.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dlearn.train import load_safetensors, load_state_into

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def path(name: str) -> Path:
    """The file `dlearn/weights/<name>.safetensors` (which may not exist)."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"a weights name is a plain file stem such as 'text2image', got {name!r}")
    return WEIGHTS_DIR / f"{name}.safetensors"


def hint(name: str) -> str:
    """What to do when the file of `name` is missing or damaged."""
    return f"Recreate it with `python -m dlearn.zoo train {name}` (or restore it with `git checkout -- dlearn/weights`)."


def info(name: str) -> dict:
    """The metadata stored with the weights: recipe, seed, training seconds, metrics, versions."""
    return load_safetensors(path(name), hint=hint(name))[1]


def load(model: nn.Module, name: str, device: str | torch.device = "cpu") -> nn.Module:
    """Read the shipped weights `name` into `model` (built with the file's architecture) and return it
    on `device`, in eval mode with gradients switched off."""
    file = path(name)
    tensors, _ = load_safetensors(file, hint=hint(name))
    load_state_into(model, tensors, file)
    return model.to(device).eval().requires_grad_(False)
