"""One readable training loop for every model in the book, and safe weight files.

`fit` samples mini-batches from tensors held in memory, takes Adam(W) steps on a loss the caller
writes, evaluates a validation metric every few steps, keeps the best weights, stops early when
the metric stops improving, and (given a directory) writes a checkpoint from which an interrupted
run resumes exactly: the same final weights as a run that was never stopped.

All randomness comes from `config.seed`: batches and the loss's noise from a `torch.Generator`
passed to the loss, dropout from torch's global generator, which `fit` forks so that the caller's
random state is left as it was.

Weights are stored as safetensors files only (no pickle): `save_safetensors` / `load_safetensors`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

LossFn = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Generator], torch.Tensor]


# --------------------------------------------------------------------------------------------
# safetensors files with clear errors
# --------------------------------------------------------------------------------------------


class WeightsFileError(RuntimeError):
    """A weights file is missing or unreadable; the message says which file and what to do."""


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write tensors (and JSON-serialisable metadata) to a safetensors file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"dlearn": json.dumps(metadata or {}, sort_keys=True)}
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)  # a run killed while writing leaves the previous file intact


def load_safetensors(path: str | Path, hint: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by `save_safetensors`: (tensors, metadata). Never unpickles anything.

    Args:
        path: the file.
        hint: what to do if it is missing or corrupted (added to the error message).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    advice = f" {hint}" if hint else ""
    if not path.is_file():
        raise WeightsFileError(f"weights file {path} does not exist.{advice}")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        metadata = json.loads(meta.get("dlearn", "{}"))
    except (SafetensorError, OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise WeightsFileError(f"weights file {path} is corrupted or not a dlearn safetensors file ({exc}).{advice}") from exc
    return tensors, metadata


def load_state_into(model: nn.Module, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """`model.load_state_dict(tensors)` with an error that names the file when the shapes disagree."""
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise WeightsFileError(f"weights in {source} do not fit {type(model).__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Settings of one training run.

    Args:
        max_steps: optimisation steps in all (a resumed run counts the steps already taken).
        batch_size: examples per step, drawn uniformly with replacement.
        lr, weight_decay: AdamW's learning rate and decoupled weight decay.
        lr_schedule: "constant", or "cosine": lr * (1 + cos(pi * step / max_steps)) / 2.
        grad_clip: clip the global gradient norm to this (None: no clipping).
        ema: keep an exponential moving average of the weights with this decay (e.g. 0.999) and
            evaluate, keep and return the averaged weights (None: no average).
        eval_every: evaluate `val_fn` (and checkpoint) every this many steps, and at the end.
        patience: stop after this many evaluations without improvement (None: never stop early).
        select: when `val_fn` returns a dict of metrics, the key of the one that selects the checkpoint
            (and drives `patience`); None: `val_fn` returns that one metric as a number.
        higher_is_better: the selecting metric's direction (False for losses, True for accuracy).
        seed: seeds batches, the loss's generator and dropout.
        checkpoint_dir: where to write `last.safetensors` (resume) and `best.safetensors`; None: none.
        progress: show a tqdm bar; None decides from DLEARN_PROGRESS ("0" or "1") or else whether
            stderr is a terminal or a notebook.
    """

    max_steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    grad_clip: float | None = 1.0
    ema: float | None = None
    eval_every: int = 100
    patience: int | None = None
    select: str | None = None
    higher_is_better: bool = False
    seed: int = 0
    checkpoint_dir: str | Path | None = None
    progress: bool | None = None

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "eval_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.patience is not None and self.patience <= 0:
            raise ValueError(f"patience must be a positive number of evaluations or None, got {self.patience}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"ema must be a decay in (0, 1) or None, got {self.ema}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` (0-based)."""
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * step / self.max_steps))
        return self.lr

    # Fields that may change between an interrupted run and its resumption.
    _RESUMABLE_CHANGES = ("max_steps", "patience", "checkpoint_dir", "progress")  # (cosine: max_steps matters)

    def fingerprint(self) -> dict:
        keep = {k: v for k, v in dataclasses.asdict(self).items() if k not in self._RESUMABLE_CHANGES}
        if self.lr_schedule == "cosine":
            keep["max_steps"] = self.max_steps
        return keep


@dataclass
class TrainResult:
    """What a run did: `history` holds one dict per evaluation (step, train_loss, val)."""

    steps: int
    best_step: int | None
    best_metric: float | None
    stopped_early: bool
    seconds: float
    history: list[dict] = field(default_factory=list)


def show_progress(progress: bool | None = None) -> bool:
    """Whether long loops should draw a progress bar (see `TrainConfig.progress`)."""
    if progress is not None:
        return progress
    env = os.environ.get("DLEARN_PROGRESS")
    if env in ("0", "1"):
        return env == "1"
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def _check_data(data: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if isinstance(data, torch.Tensor):
        data = (data,)
    data = tuple(data)
    if not data or not all(isinstance(d, torch.Tensor) for d in data):
        raise TypeError("data must be a tensor or a tuple of tensors with the examples along dimension 0")
    n = data[0].shape[0]
    if any(d.shape[0] != n for d in data) or n == 0:
        raise ValueError(f"data tensors must share a non-zero first dimension, got {[tuple(d.shape) for d in data]}")
    return data


def _optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _save_checkpoint(path: Path, model, opt, gen, config, progress_state: dict, ema_state=None) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in (ema_state or {}).items()})
    opt_tensors, opt_meta = _optimizer_to_tensors(opt)
    tensors.update(opt_tensors)
    tensors["rng.generator"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"config": config.fingerprint(), "optimizer": opt_meta, **progress_state}
    save_safetensors(path, tensors, meta)


def _selected_metric(value, select: str | None) -> tuple[float, dict[str, float]]:
    """(the selecting metric, the other metrics) of one validation result; see `TrainConfig.select`."""
    if select is None:
        if isinstance(value, dict):
            raise TypeError(f"val_fn returned a dict of metrics {sorted(value)}: name the one that selects the "
                            "checkpoint with TrainConfig(select=...)")  # fmt: skip
        return float(value), {}
    if not isinstance(value, dict):
        raise TypeError(f"TrainConfig(select={select!r}) expects val_fn to return a dict of metrics, got {type(value).__name__}")
    if select not in value:
        raise ValueError(f"val_fn's metrics {sorted(value)} lack the selecting metric {select!r}")
    if "val" in value or "step" in value or "train_loss" in value:
        raise ValueError(f"val_fn's metrics {sorted(value)} may not be named 'val', 'step' or 'train_loss' (the history's own)")
    others = {}
    for k, v in value.items():
        if k == select:
            continue
        if isinstance(v, torch.Tensor):  # logged in the history and the checkpoint's JSON: numbers, not tensors
            if v.numel() != 1:
                raise TypeError(f"val_fn's metric {k!r} is a tensor of shape {tuple(v.shape)}: log numbers (e.g. .mean().item())")
            v = v.item()
        others[k] = v
    return float(value[select]), others


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    data: Sequence[torch.Tensor] | torch.Tensor,
    config: TrainConfig,
    val_fn: Callable[[nn.Module], float | dict[str, float]] | None = None,
) -> TrainResult:
    """Train `model` to minimise `loss_fn` on mini-batches of `data`.

    Steps (each numbered in the code):
      1. resume from `checkpoint_dir/last.safetensors` if it exists (same config), else seed;
      2. sample a batch with the run's generator, compute `loss_fn(model, batch, generator)`;
      3. clip the gradient and take an AdamW step;
      4. every `eval_every` steps: evaluate `val_fn(model)` in eval mode without gradients, log its
         metrics, keep the weights best by the selecting metric, checkpoint, and stop if `patience`
         evaluations brought no improvement;
      5. at the end, load the best weights into `model` (when there is a `val_fn`).

    Args:
        model: the network; trained in place.
        loss_fn: (model, batch, generator) -> scalar loss; draw any noise from `generator`. A loss
            that needs the step number (KL warm-up, say) declares a keyword `step` and receives it.
        data: a tensor or tuple of tensors; batch i holds the same rows of each.
        config: the run's settings.
        val_fn: model -> the validation metric (a number), or a dict of metrics of which `config.select`
            names the one that selects the checkpoint (see `config.higher_is_better`). Every metric is
            logged in the history: the selecting one as "val", the others under their own names.

    Returns:
        a `TrainResult`. An interruption (KeyboardInterrupt) writes a checkpoint before it propagates.
    """
    from tqdm.auto import tqdm

    data = _check_data(data)
    n = data[0].shape[0]
    wants_step = "step" in inspect.signature(loss_fn).parameters
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir is not None else None
    sign = -1.0 if config.higher_is_better else 1.0  # internally lower is better
    st = {"step": 0, "best_step": None, "best_metric": None, "bad_evals": 0, "history": [], "stopped_early": False}
    best_state = None
    ema_state = {k: v.detach().clone() for k, v in model.state_dict().items()} if config.ema else None
    start = time.perf_counter()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        # 1. resume
        if ckpt_dir is not None and (ckpt_dir / "last.safetensors").exists():
            tensors, meta = load_safetensors(ckpt_dir / "last.safetensors", hint="Delete the directory to start afresh.")
            if meta.get("config") != json.loads(json.dumps(config.fingerprint())):
                raise ValueError(
                    f"the checkpoint in {ckpt_dir} was written with other settings ({meta.get('config')}); "
                    "use another checkpoint_dir or delete it to start afresh"
                )
            load_state_into(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, ckpt_dir)
            _optimizer_from_tensors(opt, tensors, meta["optimizer"])
            gen.set_state(tensors["rng.generator"])
            torch.set_rng_state(tensors["rng.torch"])
            st = {k: meta[k] for k in st}
            if ema_state is not None:
                ema_state = {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("ema.")}
            if (ckpt_dir / "best.safetensors").exists():
                best_state = load_safetensors(ckpt_dir / "best.safetensors")[0]

        def evaluate_and_checkpoint(train_loss: float) -> None:
            nonlocal best_state
            record = {"step": st["step"], "train_loss": train_loss}
            if val_fn is not None:
                was_training = model.training
                model.eval()
                live = None
                if ema_state is not None:  # evaluate (and keep) the averaged weights
                    live = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    model.load_state_dict(ema_state)
                with torch.no_grad():
                    metric, others = _selected_metric(val_fn(model), config.select)
                model.train(was_training)
                if not math.isfinite(metric):
                    raise FloatingPointError(f"validation metric is {metric} at step {st['step']}")
                record["val"] = metric
                record.update(others)
                if st["best_metric"] is None or sign * metric < sign * st["best_metric"]:
                    st.update(best_metric=metric, best_step=st["step"], bad_evals=0)
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    if ckpt_dir is not None:
                        save_safetensors(ckpt_dir / "best.safetensors", best_state, {"step": st["step"], "val": metric})
                else:
                    st["bad_evals"] += 1
                    if config.patience is not None and st["bad_evals"] >= config.patience:
                        st["stopped_early"] = True
                if live is not None:
                    model.load_state_dict(live)
            st["history"].append(record)
            if ckpt_dir is not None:
                _save_checkpoint(ckpt_dir / "last.safetensors", model, opt, gen, config, st, ema_state)

        model.train()
        bar = tqdm(total=config.max_steps, initial=st["step"], disable=not show_progress(config.progress), leave=False)
        running, count = 0.0, 0
        try:
            while st["step"] < config.max_steps and not st["stopped_early"]:
                # 2. a batch and its loss
                idx = torch.randint(n, (config.batch_size,), generator=gen)
                batch = tuple(d[idx].to(device) for d in data)
                loss = loss_fn(model, batch, gen, step=st["step"]) if wants_step else loss_fn(model, batch, gen)
                if loss.ndim != 0:
                    raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {st['step']}: lower lr or check the inputs")
                # 3. gradient step
                for group in opt.param_groups:
                    group["lr"] = config.lr_at(st["step"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                opt.step()
                if ema_state is not None:
                    with torch.no_grad():
                        for k, v in model.state_dict().items():
                            if v.is_floating_point():
                                ema_state[k].lerp_(v, 1 - config.ema)
                            else:
                                ema_state[k].copy_(v)
                st["step"] += 1
                running, count = running + loss.item(), count + 1
                bar.update(1)
                # 4. evaluate, keep the best, checkpoint, maybe stop
                if st["step"] % config.eval_every == 0 or st["step"] == config.max_steps:
                    evaluate_and_checkpoint(running / count)
                    running, count = 0.0, 0
                    bar.set_postfix({k: f"{v:.4g}" for k, v in st["history"][-1].items() if k != "step"})
        except KeyboardInterrupt:
            if ckpt_dir is not None:
                _save_checkpoint(ckpt_dir / "last.safetensors", model, opt, gen, config, st, ema_state)
            raise
        finally:
            bar.close()

    # 5. the best weights (the average's, with ema), else the last (average)
    if best_state is not None:
        model.load_state_dict(best_state)
    elif ema_state is not None:
        model.load_state_dict(ema_state)
    return TrainResult(
        steps=st["step"],
        best_step=st["best_step"],
        best_metric=st["best_metric"],
        stopped_early=st["stopped_early"],
        seconds=time.perf_counter() - start,
        history=st["history"],
    )
