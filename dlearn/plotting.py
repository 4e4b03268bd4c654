"""Pictures for the book: image grids, 2-D densities and samples, trajectories. Presentation only.

`savefig` writes into the book's figure folder (see `dlearn.results.output_dir`) at `FIG_DPI` (150) dots per inch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dlearn.results import output_dir

FIG_DPI = 150  # the house style: figures at 150 dpi or more


def grid_array(images: torch.Tensor, nrow: int = 10, pad: int = 1, pad_value: float | None = None) -> np.ndarray:
    """Tile images (B, 1, H, W) or (B, H, W) into one 2-D array, `nrow` images per row.

    Cells past the last image, and the padding, take `pad_value` (default: the images' minimum).
    """
    x = images.detach().cpu().double()
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ValueError(f"grid_array draws one-channel images, got {x.shape[1]} channels")
        x = x[:, 0]
    if x.ndim != 3 or x.shape[0] == 0:
        raise ValueError(f"images must have shape (B, 1, H, W) or (B, H, W) with B > 0, got {tuple(images.shape)}")
    if nrow <= 0:
        raise ValueError(f"nrow must be positive, got {nrow}")
    b, h, w = x.shape
    rows = -(-b // nrow)
    fill = float(x.min()) if pad_value is None else pad_value
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad), fill)
    for i in range(b):
        r, c = divmod(i, nrow)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = x[i].numpy()
    return out


def image_grid(images: torch.Tensor, nrow: int = 10, ax=None, title: str | None = None, vmin=None, vmax=None):
    """Show a grid of one-channel images in grey (white ink on black, as the digits are stored)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(min(8, 0.6 * nrow + 1), 0.6 * (-(-len(images) // nrow)) + 0.6))
    ax.imshow(grid_array(images, nrow), cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def density_grid(
    log_prob: Callable[[torch.Tensor], torch.Tensor], xlim=(-4.0, 4.0), ylim=(-4.0, 4.0), n: int = 150
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evaluate a 2-D log-density on an n x n grid: (X, Y, logp), each of shape (n, n)."""
    xs, ys = torch.linspace(*xlim, n, dtype=torch.float64), torch.linspace(*ylim, n, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    with torch.no_grad():
        logp = log_prob(pts).reshape(n, n)
    return gx.numpy(), gy.numpy(), logp.double().numpy()


def plot_density_2d(log_prob, ax=None, xlim=(-4.0, 4.0), ylim=(-4.0, 4.0), n: int = 150, cmap="Blues", title=None):
    """Shade a 2-D density exp(log_prob) on a grid."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    gx, gy, logp = density_grid(log_prob, xlim, ylim, n)
    ax.contourf(gx, gy, np.exp(logp), levels=20, cmap=cmap)
    ax.set_aspect("equal")
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    return ax


def plot_samples_2d(x: torch.Tensor, ax=None, labels: torch.Tensor | None = None, s: float = 3, alpha: float = 0.5, **kw):
    """Scatter 2-D points (N, 2), coloured by `labels` if given."""
    import matplotlib.pyplot as plt

    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"expected points of shape (N, 2), got {tuple(x.shape)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    c = None if labels is None else labels.cpu().numpy()
    ax.scatter(*x.detach().cpu().numpy().T, s=s, alpha=alpha, c=c, cmap="tab10" if c is not None else None, **kw)
    ax.set_aspect("equal")
    return ax


def plot_trajectories(paths: torch.Tensor, ax=None, max_paths: int = 50, color="k", alpha: float = 0.4):
    """Draw 2-D trajectories of shape (steps, N, 2): lines, with the end points marked."""
    import matplotlib.pyplot as plt

    if paths.ndim != 3 or paths.shape[2] != 2:
        raise ValueError(f"expected trajectories of shape (steps, N, 2), got {tuple(paths.shape)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    p = paths[:, :max_paths].detach().cpu().numpy()
    for i in range(p.shape[1]):
        ax.plot(p[:, i, 0], p[:, i, 1], color=color, alpha=alpha, lw=0.7)
    ax.scatter(p[-1, :, 0], p[-1, :, 1], s=6, color="C3", zorder=3)
    ax.set_aspect("equal")
    return ax


def savefig(fig, name: str, dpi: int = FIG_DPI) -> Path:
    """Save a figure as `<figures>/<name>.png` (tight, `dpi` dots per inch) and return its path."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"figure name must be a plain file stem like '00_digits_grid', got {name!r}")
    path = output_dir() / f"{name}.png"
    fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return path
