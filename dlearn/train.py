"""One readable training loop for every model in the book, and safe weight files.

`fit` samples mini-batches from tensors held in memory, takes Adam(W) steps on a loss the caller
writes, evaluates a validation metric every few steps, keeps the best weights, stops early when
the metric stops improving, and (given a directory) writes a checkpoint from which an interrupted
run resumes exactly: the same final weights and history as a run that was never stopped (see `fit`
for what "interrupted" covers).

All randomness comes from `config.seed`: batches and the loss's noise from a `torch.Generator`
passed to the loss, dropout from torch's global generator, which `fit` forks so that the caller's
random state is left as it was.

Weights are stored as safetensors files only (no pickle): `save_safetensors` / `load_safetensors`.
Each file carries a SHA-256 digest of its tensors and metadata, checked on every load, and no file
with a NaN or infinite value is written or read.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import numbers
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dlearn import fileio

LossFn = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Generator], torch.Tensor]


# --------------------------------------------------------------------------------------------
# safetensors files with a digest and clear errors
# --------------------------------------------------------------------------------------------


class WeightsFileError(RuntimeError):
    """A weights file is missing, unreadable, damaged or unverifiable; the message says which file and what to do."""


DIGEST_KEY = "dlearn.sha256"
"""The key, in a safetensors file's header metadata, of the digest `save_safetensors` writes (next to "dlearn",
which holds the JSON metadata)."""


def tensors_digest(tensors: dict[str, torch.Tensor], metadata_json: str = "{}") -> str:
    """The SHA-256 (hex) that `save_safetensors` stores with a file: over the JSON metadata string, then, for each
    tensor in the order of its name, a line `[name, dtype, shape]` and its raw bytes (row-major, little-endian as
    safetensors stores them). Any changed byte of a tensor, name, shape, dtype or of the metadata changes it."""
    h = hashlib.sha256()
    h.update(json.dumps(metadata_json).encode() + b"\n")
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode() + b"\n")
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _non_finite(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """{name: how many NaN or infinite entries} of the floating-point (and complex) tensors that have any."""
    bad = {}
    for name, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            count = int((~torch.isfinite(t)).sum())
            if count:
                bad[name] = count
    return bad


def _describe(bad: dict[str, int]) -> str:
    shown = ", ".join(f"{k!r} ({n} of them)" for k, n in sorted(bad.items())[:5])
    return shown + (f" and {len(bad) - 5} more tensors" if len(bad) > 5 else "")


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write tensors and JSON-serialisable metadata to a safetensors file, atomically (a run killed while
    writing leaves the previous file whole), with the digest `tensors_digest` under `DIGEST_KEY`.

    Raises:
        ValueError: a tensor holds NaN or infinite values (such weights are refused on load too).
        TypeError: `tensors` is not a {name: tensor} dict, or the metadata is not JSON-serialisable.
    """
    from safetensors.torch import save

    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise TypeError(f"tensors must be a dict {{name: tensor}}, got {type(tensors).__name__}")
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    bad = _non_finite(cpu)
    if bad:
        raise ValueError(f"refusing to write {path}: non-finite values (NaN or inf) in {_describe(bad)}")
    try:
        meta_json = json.dumps(metadata or {}, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the metadata written to {path} must be JSON-serialisable: {exc}") from exc
    data = save(cpu, metadata={"dlearn": meta_json, DIGEST_KEY: tensors_digest(cpu, meta_json)})
    fileio.write_bytes(path, data)


def load_safetensors(path: str | Path, hint: str = "", require_digest: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by `save_safetensors`: (tensors, metadata). Never unpickles anything.

    The file's digest is recomputed and compared with the stored one, and every floating-point tensor must be
    finite; anything else raises `WeightsFileError` naming the file, what is wrong and `hint`.

    A file without a digest (written by a dlearn from before digests, e.g. a reader's old checkpoint, or by
    another program) cannot be checked for damage: it is refused unless `require_digest` is False, and then read
    with a warning. Saving its tensors again with `save_safetensors` adds the digest. The shipped weights must
    carry one (`dlearn.shipped` requires it).

    Args:
        path: the file.
        hint: what to do if it is missing or damaged (added to the error message).
        require_digest: refuse a file that carries no digest (default); False: read it with a warning.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    advice = f" {hint}" if hint else ""
    if not path.is_file():
        raise WeightsFileError(f"weights file {path} does not exist.{advice}")
    try:
        data = path.read_bytes()  # one read: the digest is checked against the bytes the tensors came from
        tensors = load(data)
        size = int.from_bytes(data[:8], "little")  # the format: 8 bytes of header length, the JSON header, the data
        header = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        meta_json = header.get("dlearn", "{}")
        metadata = json.loads(meta_json)
        if not isinstance(metadata, dict):
            raise ValueError(f"its metadata is a JSON {type(metadata).__name__}, not an object")
    except (SafetensorError, OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise WeightsFileError(f"weights file {path} is corrupted or not a dlearn safetensors file ({exc}).{advice}") from exc
    stored = header.get(DIGEST_KEY)
    if stored is None:
        message = (f"weights file {path} carries no digest ({DIGEST_KEY}), so damage to its tensors cannot be "
                   "detected: it was written by an older dlearn or another program")  # fmt: skip
        if require_digest:
            raise WeightsFileError(f"{message}.{advice}")
        warnings.warn(f"{message}; read unverified (save it again with save_safetensors to add a digest)", stacklevel=2)
    elif stored != tensors_digest(tensors, meta_json):
        raise WeightsFileError(f"weights file {path} is corrupted: its tensors or metadata no longer match the digest "
                               f"stored with them.{advice}")  # fmt: skip
    bad = _non_finite(tensors)
    if bad:
        raise WeightsFileError(f"weights file {path} holds non-finite values (NaN or inf) in {_describe(bad)}.{advice}")
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


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class TrainConfig:
    """Settings of one training run.

    Args:
        max_steps: optimisation steps in all (a resumed run counts the steps already taken).
        batch_size: examples per step, drawn uniformly with replacement.
        lr, weight_decay: AdamW's learning rate (> 0) and decoupled weight decay (>= 0).
        lr_schedule: "constant", or "cosine": lr * (1 + cos(pi * step / max_steps)) / 2.
        grad_clip: clip the global gradient norm to this (> 0; None: no clipping).
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

    Every number must be finite and in its range (a ValueError says which is not); `fit` checks again,
    in case a field was changed after construction.
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
        self.validate()

    def validate(self) -> None:
        """Raise ValueError (a value out of range) or TypeError (a value of the wrong kind) naming the field."""
        for name in ("max_steps", "batch_size", "eval_every", "patience"):
            value = getattr(self, name)
            if name == "patience" and value is None:
                continue
            if not _is_int(value) or value <= 0:
                extra = " or None" if name == "patience" else ""
                raise ValueError(f"{name} must be a positive integer{extra}, got {value!r}")
        for name, low, closed, optional in (
            ("lr", 0.0, False, False),
            ("weight_decay", 0.0, True, False),
            ("grad_clip", 0.0, False, True),
        ):
            value = getattr(self, name)
            if optional and value is None:
                continue
            if not _is_real(value) or not math.isfinite(value) or not (value >= low if closed else value > low):
                rule = "non-negative" if closed else "positive"
                raise ValueError(f"{name} must be a {rule} finite number{' or None' if optional else ''}, got {value!r}")
        if self.ema is not None and (not _is_real(self.ema) or not 0 < self.ema < 1):
            raise ValueError(f"ema must be a decay in (0, 1) or None, got {self.ema!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not _is_int(self.seed):
            raise TypeError(f"seed must be an integer, got {self.seed!r}")
        if self.select is not None and not isinstance(self.select, str):
            raise TypeError(f"select must be the name (a str) of one of val_fn's metrics or None, got {self.select!r}")
        for name in ("higher_is_better", "progress"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "progress" and value is None):
                raise TypeError(f"{name} must be True or False{' or None' if name == 'progress' else ''}, got {value!r}")
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, (str, os.PathLike)):
            raise TypeError(f"checkpoint_dir must be a path or None, got {type(self.checkpoint_dir).__name__}")

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
    """What a run did: `history` holds one dict per evaluation (step, train_loss, val).

    `seconds` counts the training of every session of a resumed run; `resumed_seconds` is the part of it
    spent before this session, up to the checkpoint it resumed from (0.0 for a run that did not resume)."""

    steps: int
    best_step: int | None
    best_metric: float | None
    stopped_early: bool
    seconds: float
    history: list[dict] = field(default_factory=list)
    resumed_seconds: float = 0.0


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


def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's global generators that dropout draws from: the CPU's and, for a CUDA model, its device's."""
    states = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["rng.cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["rng.torch"])
    if device.type == "cuda" and "rng.cuda" in states:
        torch.cuda.set_rng_state(states["rng.cuda"], device)


def _save_checkpoint(path: Path, model, opt, gen_state, rng_states, config, progress_state: dict, ema_state=None) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in (ema_state or {}).items()})
    opt_tensors, opt_meta = _optimizer_to_tensors(opt)
    tensors.update(opt_tensors)
    tensors["rng.generator"] = gen_state
    tensors.update(rng_states)
    meta = {"config": config.fingerprint(), "optimizer": opt_meta, **progress_state}
    save_safetensors(path, tensors, meta)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) while the block runs, then deliver it: the block (an optimiser step and its
    bookkeeping) is never left half done. Outside the main thread, where signals cannot be caught, a no-op."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # (None: a handler installed outside Python, which could not be put back)
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)  # to the handler that was there (KeyboardInterrupt by default)


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

    Interruptions. Given a `checkpoint_dir`, a run stopped and then run again with the same model, data, loss,
    val_fn and config (max_steps, patience and progress may change) ends with the same weights, history, best
    checkpoint and early stopping as a run never stopped, whether it was stopped by
      - a KeyboardInterrupt (Ctrl-C, or one raised by the loss or val_fn) anywhere in the loop: the checkpoint
        it writes before the interruption propagates holds the state at the start of the step in progress (its
        batch and noise are drawn again on resume), or before the evaluation in progress (which the resumed
        run repeats); Ctrl-C during the optimiser step takes effect once the step is done;
      - a kill (kill -9, a crash, a power cut): the run resumes from the last evaluation's checkpoint and
        takes the steps after it again.
    A checkpoint holds the weights and their buffers, AdamW's state, the average (ema), the state of the run's
    generator and of torch's (dropout's; for a CUDA model also its device's), the step, the training loss summed
    since the last evaluation, the best metric, its step and weights (`best.safetensors`), the count towards
    `patience`, the history and the seconds trained. It cannot hold what lives outside `fit`: state that the
    loss or val_fn keep between calls, randomness they draw from other generators, data that changed; nor is a
    run resumed on another machine, thread count or library version bit-identical (kernels may add up in
    another order).

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

    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    config.validate()  # again: a field may have been set after construction
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    params = list(model.parameters())
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters to train")
    if not callable(loss_fn) or (val_fn is not None and not callable(val_fn)):
        raise TypeError(f"loss_fn and val_fn must be callables, got {type(loss_fn).__name__} and {type(val_fn).__name__}")
    data = _check_data(data)
    n = data[0].shape[0]
    wants_step = "step" in inspect.signature(loss_fn).parameters
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir is not None else None
    sign = -1.0 if config.higher_is_better else 1.0  # internally lower is better
    st = {"step": 0, "best_step": None, "best_metric": None, "bad_evals": 0, "history": [], "stopped_early": False,
          "loss_sum": 0.0, "loss_count": 0, "eval_pending": False, "seconds": 0.0}  # fmt: skip
    best_state = None
    ema_state = {k: v.detach().clone() for k, v in model.state_dict().items()} if config.ema else None
    start = time.perf_counter()
    resumed_seconds = 0.0
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []

    def checkpoint(state: dict, gen_state: torch.Tensor, rng_states: dict) -> None:
        state = {**state, "seconds": resumed_seconds + time.perf_counter() - start}
        _save_checkpoint(ckpt_dir / "last.safetensors", model, opt, gen_state, rng_states, config, state, ema_state)

    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(config.seed)
        # 1. resume
        if ckpt_dir is not None and (ckpt_dir / "last.safetensors").exists():
            last = ckpt_dir / "last.safetensors"
            again = "Delete the directory to start afresh."
            tensors, meta = load_safetensors(last, hint=again, require_digest=False)  # an older dlearn's: a warning
            if meta.get("config") != json.loads(json.dumps(config.fingerprint())):
                raise ValueError(
                    f"the checkpoint in {ckpt_dir} was written with other settings ({meta.get('config')}); "
                    "use another checkpoint_dir or delete it to start afresh"
                )
            try:
                load_state_into(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, last)
                _optimizer_from_tensors(opt, tensors, meta["optimizer"])
                gen.set_state(tensors["rng.generator"])
                _set_rng_states(tensors, device)
            except (KeyError, ValueError) as exc:
                raise WeightsFileError(f"checkpoint {last} is incomplete or not a checkpoint of fit ({exc!r}). {again}") from exc
            st = {k: meta.get(k, default) for k, default in st.items()}  # (an older dlearn's checkpoint lacks some)
            resumed_seconds = st["seconds"]
            if ema_state is not None:
                ema_state = {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("ema.")}
            if (ckpt_dir / "best.safetensors").exists():
                best_state = load_safetensors(ckpt_dir / "best.safetensors", hint=again, require_digest=False)[0]

        def evaluate_and_checkpoint() -> None:
            nonlocal best_state
            count = st["loss_count"]
            record = {"step": st["step"], "train_loss": st["loss_sum"] / count if count else float("nan")}
            if val_fn is not None:
                was_training, live = model.training, None
                try:
                    model.eval()
                    if ema_state is not None:  # evaluate (and keep) the averaged weights
                        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
                        model.load_state_dict(ema_state)
                    with torch.no_grad():
                        metric, others = _selected_metric(val_fn(model), config.select)
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
                finally:  # the live weights back, even when val_fn is interrupted
                    if live is not None:
                        model.load_state_dict(live)
                    model.train(was_training)
            st["history"].append(record)
            st.update(loss_sum=0.0, loss_count=0, eval_pending=False)
            if ckpt_dir is not None:
                checkpoint(st, gen.get_state(), _rng_states(device))

        model.train()
        bar = tqdm(total=config.max_steps, initial=st["step"], disable=not show_progress(config.progress), leave=False)
        # Where a KeyboardInterrupt finds the run, and what to roll back to (see the docstring).
        phase, snapshot = "between steps", None
        try:
            while True:
                # 4. evaluate, keep the best, checkpoint, maybe stop (after the step that ends an interval)
                if st["eval_pending"]:
                    snapshot = (copy.deepcopy(st), _rng_states(device))
                    phase = "evaluating"
                    evaluate_and_checkpoint()
                    phase = "between steps"
                    bar.set_postfix({k: f"{v:.4g}" for k, v in st["history"][-1].items() if k != "step"})
                if st["step"] >= config.max_steps or st["stopped_early"]:
                    break
                # 2. a batch and its loss
                snapshot = (gen.get_state(), _rng_states(device), [b.detach().clone() for b in model.buffers()])
                phase = "in a step"
                idx = torch.randint(n, (config.batch_size,), generator=gen)
                batch = tuple(d[idx].to(device) for d in data)
                loss = loss_fn(model, batch, gen, step=st["step"]) if wants_step else loss_fn(model, batch, gen)
                if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                    raise ValueError(f"loss_fn must return a scalar tensor, got {getattr(loss, 'shape', type(loss).__name__)}")
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {st['step']}: lower lr or check the inputs")
                # 3. gradient step
                for group in opt.param_groups:
                    group["lr"] = config.lr_at(st["step"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                loss_value = loss.item()
                with _sigint_deferred():  # the update and its bookkeeping are taken whole
                    opt.step()
                    if ema_state is not None:
                        with torch.no_grad():
                            for k, v in model.state_dict().items():
                                if v.is_floating_point():
                                    ema_state[k].lerp_(v, 1 - config.ema)
                                else:
                                    ema_state[k].copy_(v)
                    st["step"] += 1
                    st["loss_sum"] += loss_value
                    st["loss_count"] += 1
                    st["eval_pending"] = st["step"] % config.eval_every == 0 or st["step"] == config.max_steps
                    phase = "between steps"
                bar.update(1)
        except KeyboardInterrupt:
            if ckpt_dir is not None:
                if phase == "in a step":  # back to the step's start: the resumed run draws its batch again
                    gen_state, rng_states, buffers = snapshot
                    with torch.no_grad():
                        for b, saved in zip(model.buffers(), buffers, strict=True):
                            b.copy_(saved)  # (batch norm's running statistics, say)
                    checkpoint(st, gen_state, rng_states)
                elif phase == "evaluating":  # back to before the evaluation, which the resumed run repeats
                    saved_st, rng_states = snapshot
                    checkpoint(saved_st, gen.get_state(), rng_states)
                else:
                    checkpoint(st, gen.get_state(), _rng_states(device))
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
        seconds=resumed_seconds + time.perf_counter() - start,
        history=st["history"],
        resumed_seconds=resumed_seconds,
    )
