"""Clear errors for bad input, shared by the chapters: numbers, integers in a range, tensors' values, prompt lists.

Each check raises a TypeError (wrong kind of thing) or a ValueError (right kind, wrong value) that names the
argument, what was expected and what came; none of them changes its input. The tensor checks cost one reduction
(a min/max or a finiteness test) and one transfer to the host: call them once at an entry point, not in every
step of a sampling loop.
"""

from __future__ import annotations

import math
import numbers

import torch


def finite_number(name: str, value) -> None:
    """A real number (not a bool, not a tensor) that is finite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} should be a finite number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} should be a finite number, got {value}")


def number_in(name: str, value, low: float, high: float = math.inf) -> None:
    """A finite real number in [low, high]."""
    finite_number(name, value)
    if not low <= value <= high:
        raise ValueError(f"{name} should be in [{low}, {high}], got {value}")


def integer_in(name: str, value, low: int, high: int) -> None:
    """An integer (Python, NumPy, or a one-element integer tensor; not a bool) in low..high."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() and value.dtype != torch.bool:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} should be an integer in {low}..{high}, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} should be an integer in {low}..{high}, got {value}")


def finite_tensor(name: str, x: torch.Tensor) -> None:
    """A tensor whose values are all finite (no NaN, no inf)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} should be a tensor, got {type(x).__name__}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} should be finite, got {bad} NaN or infinite value(s) in a {x.dtype} {tuple(x.shape)} tensor")


def values_in(name: str, x: torch.Tensor, low: float, high: float, tol: float = 1e-4, hint: str = "") -> None:
    """A tensor whose values are finite and lie in [low, high] (up to `tol`, for rounding); `hint` says what to do."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} should be a tensor with values in [{low}, {high}], got {type(x).__name__}")
    if x.numel() == 0:
        return
    y = x.detach() if x.dtype != torch.bool else x.detach().to(torch.uint8)
    lo, hi = torch.stack(torch.aminmax(y)).tolist()
    if low - tol <= lo and hi <= high + tol:  # False for NaN
        return
    found = "NaN values" if math.isnan(lo) or math.isnan(hi) else f"values in [{lo:g}, {hi:g}]"
    hint = f"; {hint}" if hint else ""
    raise ValueError(f"{name} should hold finite values in [{low:g}, {high:g}], got {found} ({x.dtype} {tuple(x.shape)}){hint}")


def string_list(name: str, values) -> None:
    """A non-empty list (or tuple) of strings, not one bare string."""
    if isinstance(values, str):
        raise TypeError(f"{name} should be a list of strings (one per image), got the bare string {values!r}: use [{values!r}]")
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} should be a list of strings (one per image), got {type(values).__name__}")
    if len(values) == 0:
        raise ValueError(f"{name} should hold at least one string, got an empty {type(values).__name__}")
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{name} should hold strings only, got {type(bad[0]).__name__} {bad[0]!r}")


def weights_fingerprint(*tensors_or_modules) -> str:
    """A hash of parameters and tensors (N8: null-text inversion changes neither the model nor the condition)."""
    import hashlib

    h = hashlib.sha256()
    for obj in tensors_or_modules:
        items = obj.state_dict().items() if hasattr(obj, "state_dict") else [("", obj)]
        for k, v in items:
            h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
