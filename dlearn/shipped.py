"""Where the book's shipped weights live, and how one file is read into a model.

    from dlearn import shipped, text2image
    base = shipped.load(text2image.TextToImage(), "text2image")   # eval mode, gradients off
    shipped.info("text2image")["metrics"]                           # what the file records

Every file carries a SHA-256 digest of its tensors and metadata (`dlearn.train.save_safetensors`). Reading one
recomputes it and checks that every value is finite: a damaged file, a file of NaNs or a file without a digest
raises `WeightsFileError` naming the file and how to recreate or restore it (`hint`).

This is the file layer only: which recipe trains each file, and how its metrics are re-measured,
is the registry's business (`dlearn.zoo`), which stands after the studies in the package's layering.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dlearn import fileio
from dlearn.train import WeightsFileError, load_safetensors, load_state_into

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
RESTORE = "restore it with `git checkout -- dlearn/weights`"
RECORDS = "records.json"  # in WEIGHTS_DIR: {name: metadata} of models whose number ships without their weights


def path(name: str) -> Path:
    """The file `dlearn/weights/<name>.safetensors` (which may not exist)."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"a weights name is a plain file stem such as 'text2image', got {name!r}")
    return WEIGHTS_DIR / f"{name}.safetensors"


def hint(name: str) -> str:
    """What to do when the file of `name` is missing or damaged."""
    return f"Recreate it with `python -m dlearn.zoo train {name}` (or {RESTORE})."


def info(name: str) -> dict:
    """The metadata stored with the weights: recipe, seed, training seconds, metrics, versions (the file verified)."""
    return load_safetensors(path(name), hint=hint(name), require_digest=True)[1]


def load(model: nn.Module, name: str, device: str | torch.device = "cpu") -> nn.Module:
    """Read the shipped weights `name` into `model` (built with the file's architecture) and return it
    on `device`, in eval mode with gradients switched off. The file's digest must be present and verify, and
    every value be finite, or `WeightsFileError` says which file and how to restore it."""
    file = path(name)
    tensors, _ = load_safetensors(file, hint=hint(name), require_digest=True)
    load_state_into(model, tensors, file)
    return model.to(device).eval().requires_grad_(False)


def records() -> dict[str, dict]:
    """Every record that ships without its weights: {name: the metadata its training wrote}."""
    file = WEIGHTS_DIR / RECORDS
    if not file.is_file():
        return {}
    try:
        found = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsFileError(f"records file {file} is unreadable ({exc}); {RESTORE}") from exc
    if not isinstance(found, dict):
        raise WeightsFileError(f"records file {file} should hold a JSON object {{name: metadata}}, got {type(found).__name__}")
    return found


def record(name: str) -> dict:
    """The metadata of `name` as its record ships it (recipe, seeds, metrics, history), without weights."""
    found = records()
    if name not in found:
        raise WeightsFileError(f"no record named {name!r} in {WEIGHTS_DIR / RECORDS}. {hint(name)}")
    return found[name]


def save_record(name: str, metadata: dict) -> None:
    """Write (or replace) the record of `name`, atomically and under the records file's lock (`dlearn.fileio`):
    a crash leaves the previous file whole, and two writers keep each other's records."""
    path(name)  # validates the name
    with fileio.locked(WEIGHTS_DIR / RECORDS):
        found = records()
        found[name] = metadata
        fileio.write_text(WEIGHTS_DIR / RECORDS, json.dumps(dict(sorted(found.items())), indent=1, sort_keys=True) + "\n")
